r"""``python -m energy.hessian analyze``: blockwise curvature of a Hugging Face Transformer.

``--model`` is a local Hugging Face model directory (``config.json``; the weights when present, else a seeded random
initialisation) or a preset of :data:`energy.hessian.hf.PRESETS`. The data are seeded random token ids (``--batch``,
``--seq-len``, ``--num-batches``, ``--seed``; random pixels for ViT) or ``--data FILE``, a ``.pt`` tensor of token
ids of shape ``(N, T)``. The objective is the model's standard loss, the mean over every counted target of all
batches (:mod:`energy.hessian.hf`).

For every block matched by ``--blocks`` (names or glob patterns of :func:`energy.hessian.hf_blocks.block_catalogue`;
default: per-head Q/K/V of every attention layer, each layer's O projection, MLP and norms, the embeddings) and
every part ``A`` of ``--parts`` (``H``, ``H_o``, ``H_f``), ``--what`` chooses

* ``norms``: :math:`\|A_{aa}\|_F` (exact by columns up to ``--exact-max`` entries, else Hutch++ with
  ``--num-matvecs`` products) and, for ``H``, the trace;
* ``top-eigenvalues``: the ``--top-k`` largest eigenvalues of :math:`A_{aa}` (Lanczos);
* ``density``: the SLQ spectral density (``--probes`` probes, ``--steps`` Lanczos steps, ``--grid`` points).

The JSON written to ``--json`` (atomically; the path is checked writable before anything is computed) holds the run
settings and one record per block: ``name``, ``params`` (number of entries), ``tensors``, ``frobenius``
``{part: value}`` with ``frobenius_stderr`` and ``exact``, ``trace``, ``top_eigenvalues`` ``{part: [...]}``,
``density`` ``{part: {"grid": [...], "values": [...], "kernel_width": s}}`` and ``seconds``. Progress goes to stderr.
Bad usage ends with one line and exit status 2.

Under ``torchrun --nproc_per_node N -m energy.hessian analyze ...`` the same command runs data-parallel (MATH §6.1):
every rank builds the same batches, keeps its contiguous share (:func:`energy.hessian.distributed.shard_batches`),
and every product is summed over the ranks, so the records equal one process's; rank 0 alone shows progress and
writes the JSON, which also records ``world_size``. Messages carry ``[rank r/N]``; a failing rank makes every rank
stop (``--timeout`` bounds every wait for a rank that stops answering).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["DEFAULT_BLOCKS", "WHAT", "analyze", "main"]

#: Blocks analysed when ``--blocks`` is not given (patterns that match nothing for a model are skipped).
DEFAULT_BLOCKS = ("embed", "pos_embed", "layer*.head*.Q", "layer*.head*.K", "layer*.head*.V", "layer*.kv_head*.K",
                  "layer*.kv_head*.V", "layer*.attn.O", "layer*.mlp", "layer*.ln1", "layer*.ln2")
WHAT = ("norms", "top-eigenvalues", "density")
PARTS = ("H", "H_o", "H_f")


def _floats(t: torch.Tensor) -> list[float]:
    return [float(x) for x in t.reshape(-1)]


def analyze(bc: Any, blocks: Sequence[Any], *, what: Sequence[str], parts: Sequence[str], top_k: int,
            num_matvecs: int, probes: int, steps: int, grid: int, seed: int, progress: Any = None) -> list[dict]:
    """One record per block (module docstring) from a :class:`~energy.hessian.hf_blocks.BlockCurvature` ``bc``."""
    records = []
    total = len(blocks) * len(parts)
    done = 0
    for block in blocks:
        t0 = time.perf_counter()
        n = bc.operator(block, None, parts[0]).shape[0]
        rec: dict[str, Any] = {"name": block.name, "params": int(n), "tensors": list(block.tensors)}
        for part in parts:
            gen = torch.Generator().manual_seed(seed)
            if "norms" in what:
                est = bc.frobenius(block, None, part, num_matvecs=num_matvecs, generator=gen)
                rec.setdefault("frobenius", {})[part] = est.value
                rec.setdefault("frobenius_stderr", {})[part] = est.stderr
                rec["exact"] = n <= bc.exact_max or num_matvecs > n
                if part == "H":
                    rec["trace"] = bc.trace(block, part, num_matvecs=max(3, num_matvecs), generator=gen).value
            if "top-eigenvalues" in what:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # convergence is reported in the record
                    res = bc.top_eigenvalues(block, part, min(top_k, n), generator=gen)
                rec.setdefault("top_eigenvalues", {})[part] = _floats(res.eigenvalues)
                rec.setdefault("lanczos_converged", {})[part] = bool(res.converged)
            if "density" in what:
                d = bc.density(block, part, num_probes=probes, num_steps=steps, num_grid=grid, generator=gen)
                rec.setdefault("density", {})[part] = {"grid": _floats(d.grid), "values": _floats(d.density),
                                                       "kernel_width": d.kernel_width}
            done += 1
            if progress is not None:
                progress(done, total, f"{block.name} {part}")
        rec["seconds"] = time.perf_counter() - t0
        records.append(rec)
    return records


def _progress_bar(done: int, total: int, label: str) -> None:
    width = 24
    filled = int(width * done / max(total, 1))
    end = "\n" if done == total else ""
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label[:48]:<48}", end=end, file=sys.stderr,
          flush=True)


def _csv(value: str, allowed: Sequence[str], flag: str) -> list[str]:
    from energy._cli import UsageError

    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if not items or bad:
        raise UsageError(f"{flag} {value!r}: expected a comma-separated subset of {','.join(allowed)}"
                         f"{'; unknown: ' + ', '.join(bad) if bad else ''}")
    return list(dict.fromkeys(items))


def _load_tokens(path: str) -> torch.Tensor:
    from energy._cli import UsageError

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--data {path}: no such file; give a .pt file holding a tensor of token ids (N, T)")
    try:
        tokens = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a usage error
        raise UsageError(f"--data {path}: cannot be read as a torch tensor ({type(exc).__name__}); save one with "
                         "torch.save(token_ids, path)") from None
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.is_floating_point():
        raise UsageError(f"--data {path}: expected an integer tensor of token ids of shape (N, T), got "
                         f"{getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}")
    return tokens


def main(argv: list[str] | None = None, *, prog: str = "python -m energy.hessian analyze") -> int:
    """``python -m energy.hessian analyze --model PATH --json OUT [...]``; returns the exit status (0, 1, 2, 130)."""
    from energy._cli import Parser, UsageError, check_writable_file, run_command
    from energy._io import atomic_write_text, finite_json
    from energy._validation import EnergyInputError

    def body() -> int:
        from energy.hessian import hf
        from energy.hessian.distributed import init_from_env, shard_batches
        from energy.hessian.hf_blocks import BlockCurvature, _model_type

        parser = Parser(prog=prog, description=(__doc__ or "").split("\n\n")[0].split(": ", 1)[-1])
        parser.add_argument("--model", required=True, metavar="PATH",
                            help=f"Hugging Face model directory or a preset ({', '.join(hf.PRESETS)})")
        parser.add_argument("--json", metavar="OUT", help="write the records to this JSON file")
        parser.add_argument("--data", metavar="FILE", help="a .pt tensor of token ids (N, T) instead of random tokens")
        parser.add_argument("--batch", type=int, default=2, help="sequences (or images) per batch")
        parser.add_argument("--seq-len", type=int, default=8, help="tokens per random sequence")
        parser.add_argument("--num-batches", type=int, default=1, help="random batches")
        parser.add_argument("--seed", type=int, default=0, help="seed of weights (if none on disk), data, probes")
        parser.add_argument("--blocks", nargs="+", metavar="PATTERN", help="block names or glob patterns "
                            "(default: per-head Q/K/V, O, MLP, norms and embeddings of every layer)")
        parser.add_argument("--what", default=",".join(WHAT), help=f"comma-separated subset of {','.join(WHAT)}")
        parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
        parser.add_argument("--top-k", type=int, default=3, help="top eigenvalues per block and part")
        parser.add_argument("--num-matvecs", type=int, default=30, help="Hutch++ products per norm / trace")
        parser.add_argument("--probes", type=int, default=4, help="SLQ probes")
        parser.add_argument("--steps", type=int, default=20, help="Lanczos steps per SLQ probe (≤ block size)")
        parser.add_argument("--grid", type=int, default=64, help="points of the density grid")
        parser.add_argument("--exact-max", type=int, default=256, help="largest block whose norms are computed exactly")
        parser.add_argument("--list-blocks", action="store_true", help="list the model's block names and exit")
        parser.add_argument("--quiet", action="store_true", help="no progress bar")
        parser.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                            help="under torchrun: the longest wait for another rank before every rank stops")
        args = parser.parse_args(argv)
        if not args.timeout > 0:
            raise UsageError(f"--timeout must be a positive number of seconds, got {args.timeout}")
        for flag in ("batch", "seq_len", "num_batches", "top_k", "probes", "steps", "grid", "exact_max"):
            if getattr(args, flag) < 1:
                raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
        if args.num_matvecs < 3:
            raise UsageError(f"--num-matvecs must be at least 3 (Hutch++), got {args.num_matvecs}")
        what, parts = _csv(args.what, WHAT, "--what"), _csv(args.parts, PARTS, "--parts")
        if args.json is None and not args.list_blocks:
            raise UsageError("--json OUT is required (where to write the records), e.g. --json blocks.json")
        shards = init_from_env(timeout=args.timeout)
        rank, world = (0, 1) if shards is None else (shards.rank, shards.world_size)
        lead = rank == 0

        def writable() -> Path | None:
            return None if args.json is None or not lead else check_writable_file(args.json, "--json")

        out = writable() if shards is None else shards.run(writable, "checking that --json is writable")
        try:
            if Path(args.model).is_dir():
                model = hf.load_model(args.model, seed=args.seed)
            elif args.model in hf.PRESETS:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # transformers' notes on tiny vocabularies
                    model = hf.build_model(args.model, seed=args.seed)
            else:
                raise UsageError(f"--model {args.model}: neither a directory with config.json nor a preset; presets: "
                                 f"{', '.join(hf.PRESETS)}")
            if args.list_blocks:
                from energy.hessian.hf_blocks import block_catalogue

                if lead:
                    print("\n".join(block_catalogue(model)))
                return 0
            if args.data is not None:
                data = hf.token_batches(model, _load_tokens(args.data), batch=args.batch, seed=args.seed)
            else:
                cfg = hf._config(model)
                max_len = next((getattr(cfg, k) for k in ("n_positions", "max_position_embeddings", "n_ctx")
                                if isinstance(getattr(cfg, k, None), int)), None)
                if isinstance(max_len, int) and args.seq_len > max_len:
                    raise UsageError(f"--seq-len {args.seq_len} exceeds the model's {max_len} positions")
                data = hf.synthetic_batches(model, batch=args.batch, seq_len=args.seq_len,
                                            num_batches=args.num_batches, seed=args.seed)
            if shards is not None and len(data) < world:
                raise UsageError(f"{len(data)} batch(es) cannot be shared by {world} ranks: give every rank at least "
                                 f"one batch (--num-batches ≥ {world}, or more rows in --data)")
            shard = data if shards is None else shard_batches(data, rank, world)
            with warnings.catch_warnings(record=True) as notes:
                warnings.simplefilter("always", UserWarning)
                bc = BlockCurvature(model, shard, exact_max=args.exact_max, distributed=shards or False)
            for note in notes if lead else ():
                print(f"{prog}: note: {note.message}", file=sys.stderr)
            blocks = bc.blocks(args.blocks or DEFAULT_BLOCKS, allow_empty=args.blocks is None)
            if not blocks:
                raise UsageError("no default block exists for this model; name blocks with --blocks "
                                 "(see --list-blocks)")
            if lead and "density" in what and any(args.steps > b.numel(_shapes(model)) for b in blocks):
                small = min(b.numel(_shapes(model)) for b in blocks)
                print(f"{prog}: note: SLQ steps capped at the block size for blocks smaller than --steps "
                      f"{args.steps} (smallest: {small})", file=sys.stderr)
        except EnergyInputError as exc:
            raise UsageError(str(exc)) from None
        t0 = time.perf_counter()
        records = analyze(bc, blocks, what=what, parts=parts, top_k=args.top_k, num_matvecs=args.num_matvecs,
                          probes=args.probes, steps=args.steps, grid=args.grid, seed=args.seed,
                          progress=None if args.quiet or not lead else _progress_bar)
        parent = bc.operator(blocks[0], None, parts[0]).parent
        num_targets, loss = parent.num_data, float(parent.loss())
        if not lead:
            return 0
        doc = {
            "command": "analyze", "model": args.model, "model_class": type(model).__name__,
            "model_type": _model_type(model), "task": hf.task_of(model),
            "num_parameters": sum(p.numel() for p in torch.nn.Module.parameters(model)),
            "settings": {"data": args.data, "batch": args.batch, "seq_len": None if args.data else args.seq_len,
                         "num_batches": len(data), "seed": args.seed, "blocks": args.blocks or list(DEFAULT_BLOCKS),
                         "what": what, "parts": parts, "top_k": args.top_k, "num_matvecs": args.num_matvecs,
                         "probes": args.probes, "steps": args.steps, "grid": args.grid, "exact_max": args.exact_max},
            "num_targets": num_targets, "loss": loss, "world_size": world,
            "torch": torch.__version__, "seconds": time.perf_counter() - t0, "blocks": records,
        }
        assert out is not None
        atomic_write_text(out, json.dumps(finite_json(doc), indent=1, allow_nan=False) + "\n")
        print(f"{len(records)} block(s) x {len(parts)} part(s) -> {out}")
        return 0

    shared = _rank_label()
    if shared:
        signal.signal(signal.SIGTERM, _stopped_by_launcher)
    status = run_command(prog + shared, body, argv)
    if shared and status != 0:  # a failed distributed run: exit now, before gloo's threads are torn down (that can
        sys.stdout.flush()  # abort the interpreter once a peer has left) -- the message is already printed
        sys.stderr.flush()
        os._exit(status)
    if shared and torch.distributed.is_initialized():  # every rank done (rank 0 has written): leave together,
        torch.distributed.barrier()  # then exit without the interpreter's teardown of gloo's threads (it can abort
        torch.distributed.destroy_process_group()  # once the group is gone: "terminate called without an active
        sys.stdout.flush()  # exception")
        sys.stderr.flush()
        os._exit(status)
    return status


def _stopped_by_launcher(signum: int, frame: Any) -> None:
    """The launcher stops the other ranks (SIGTERM) when one fails: say so in one line, not die silently."""
    from energy._cli import Interrupted

    exc = Interrupted("stopped by the launcher (SIGTERM): another rank failed (its message says why) or the job was "
                      "cancelled; nothing was written (the JSON is written atomically at the end)")
    exc.code = 128 + signum
    raise exc


def _rank_label() -> str:
    """`` [rank r/N]`` under torchrun (``WORLD_SIZE > 1``), else empty."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f" [rank {os.environ.get('RANK', '?')}/{world}]" if world > 1 else ""


def _shapes(model: Any) -> dict[str, torch.Size]:
    return {n: p.shape for n, p in torch.nn.Module.named_parameters(model)}


if __name__ == "__main__":
    sys.exit(main())
