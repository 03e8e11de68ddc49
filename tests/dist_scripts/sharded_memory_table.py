"""The README's memory model of one Hessian-vector product of a 7B LLaMA-shaped model under FSDP2 (bytes per rank).

Usage: ``PYTHONPATH=. python tests/dist_scripts/sharded_memory_table.py`` prints the markdown tables. Every number
comes from
:mod:`energy.hessian.sharded` (``llama_parameter_count``, ``llama_activation_elements_per_token``,
``memory_model``, ``fd_step``, ``fd_error_model``); the double-backward factor and the implementation overhead are
measured here (``saved_activation_bytes``) on a small float64 Hugging Face LLaMA with the 7B's ``f/d`` ratio.
"""

from __future__ import annotations

import torch

from energy.hessian import hf
from energy.hessian.sharded import (
    fd_error_model,
    fd_step,
    llama_activation_elements_per_token,
    llama_parameter_count,
    memory_model,
    saved_activation_bytes,
)

D, LAYERS, FFN, VOCAB, HEADS = 4096, 32, 11008, 32000, 32
TOKENS = 2048  # one sequence of 2048 tokens per rank
GB = 1e9


def measured_factors() -> tuple[float, float]:
    """(forward + create_graph backward) / forward saved bytes, and HF forward / the minimum formula."""
    d, f, h, s, b = 64, 172, 4, 64, 2
    model = hf.build_model("llama-tiny", hidden_size=d, intermediate_size=f, num_attention_heads=h,
                           num_key_value_heads=h, max_position_embeddings=s)
    wrapped = hf.LogitsModel(model)
    loss = hf.loss_for(hf.task_of(wrapped))
    (X, y), = hf.synthetic_batches(model, batch=b, seq_len=s)
    forward = saved_activation_bytes(wrapped, loss, X, y, create_graph=False)
    double = saved_activation_bytes(wrapped, loss, X, y, create_graph=True)
    cfg = model.config
    minimum = llama_activation_elements_per_token(d, cfg.num_hidden_layers, f, h, cfg.vocab_size, s,
                                                  eager_attention=True) * 8 * b * s
    return double / forward, forward / minimum


def main() -> None:
    torch.set_num_threads(1)
    factor, overhead = measured_factors()
    p = llama_parameter_count(D, LAYERS, FFN, VOCAB, heads=HEADS)
    unit = llama_parameter_count(D, 1, FFN, 0, heads=HEADS) - D  # one decoder layer (no embeddings, no final norm)
    print(f"P = {p:,} parameters; largest FSDP unit (one decoder layer) = {unit:,}; {TOKENS} tokens per rank")
    print(f"measured: double backward saves {factor:.2f}x the forward's activations; the HF LLaMA saves "
          f"{overhead:.2f}x the minimum formula\n")
    print("| method | dtype | attention | N ranks | θ shard | grad shard | HVP state | unsharded | activations "
          "| total GB/rank |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for method, eager_modes in (("finite_difference", (False, True)), ("exact", (True,))):
        for name, nbytes in (("bf16", 2), ("fp32", 4), ("float64", 8)):
            for eager in eager_modes:
                acts = llama_activation_elements_per_token(D, LAYERS, FFN, HEADS, VOCAB, TOKENS,
                                                           eager_attention=eager)
                for n in (8, 64):
                    m = memory_model(p, unit, ranks=n, bytes_per_element=nbytes, activation_elements_per_token=acts,
                                     tokens_per_rank=TOKENS, method=method,  # type: ignore[arg-type]
                                     double_backward_factor=factor)
                    print(f"| {method} | {name} | {'eager' if eager else 'flash'} | {n} | {m.parameters / GB:.2f} "
                          f"| {m.gradients / GB:.2f} | {m.hvp_state / GB:.2f} | {m.unsharded_parameters / GB:.2f} "
                          f"| {m.activations / GB:.1f} | {m.total / GB:.1f} |")
    print("\n| dtype | machine ε | step ε‖v‖ | modelled relative error floor |")
    print("|---|---:|---:|---:|")
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        u, eps = float(torch.finfo(dtype).eps), fd_step(dtype)
        print(f"| {str(dtype)[6:]} | {u:.1e} | {eps:.1e} | {fd_error_model(eps, u, 1.0):.1e} |")


if __name__ == "__main__":
    main()
