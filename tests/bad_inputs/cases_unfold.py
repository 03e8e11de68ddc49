"""Bad inputs to ``unfold`` (steps, unroll/Unrolled, parametrizations, presets, converters, standard models, data
loaders, train, model files) and to ``paper_figs`` (registry, io)."""

from __future__ import annotations

import functools
import math
import re

import torch
from torch import nn

import unfold
from energy import StepSizeWarning
from paper_figs import io as pio
from paper_figs import registry as preg
from unfold import data, modelfile

from . import _files as F
from ._case import FIX, Case
from ._gen import arg, enum_case, scalar_cases, tensor_cases, with_nan

f64 = torch.float64
f32 = torch.float32
d = 4
g = torch.Generator().manual_seed(2)
Y32 = torch.randn(2, 3, d, generator=g)


def body(**kw: object) -> unfold.Unrolled:
    torch.manual_seed(0)
    return unfold.unroll(("attention", "ffn"), depth=1, d=d, **kw)


@functools.cache
def classifier() -> unfold.UnrolledClassifier:
    torch.manual_seed(0)
    return unfold.yang2022(d=d, depth=1, d_in=3, n_classes=2)


def path_re(p: object) -> str:
    """The message names the file."""
    return re.escape(str(p).rsplit("/", 1)[-1])


FILE_FIX = r"(?i)exist|give|pass|check|expected|not a|empty|corrupt|trunca|writ|save_model|directory|re-?save"
FILE_EXC = (ValueError, TypeError, OSError)

CASES: list[Case] = []
add = CASES.extend

# --- unroll / Unrolled ------------------------------------------------------------------------------------------------
add(scalar_cases("unroll", "depth", lambda v: unfold.unroll(("attention",), depth=v, d=d),
                 bad=(("zero", 0), ("neg", -1), ("float", 2.5), ("bool", True), ("str", "2"))))
add(scalar_cases("unroll", "d", lambda v: unfold.unroll(("attention",), depth=1, d=v),
                 bad=(("zero", 0), ("neg", -2), ("float", 4.0), ("none", None))))
add([
    Case("unroll:schedule-unknown-step", lambda: unfold.unroll(("attn",), depth=1, d=d),
         (r"attn", r"valid names|'attention'")),
    Case("unroll:schedule-empty", lambda: unfold.unroll((), depth=1, d=d), (arg("schedule"), r"(?i)empty|at least")),
    Case("unroll:schedule-str", lambda: unfold.unroll("attention", depth=1, d=d), (arg("schedule"),
                                                                                  r"(?i)list|sequence|tuple")),
    Case("unroll:alphas-nan", lambda: unfold.unroll(("attention",), depth=1, d=d, alphas=math.nan),
         (r"alpha", r"(?i)finite|nan")),
    Case("unroll:alphas-unknown-step", lambda: unfold.unroll(("attention",), depth=1, d=d, alphas={"ffm": 0.5}),
         (r"ffm", r"'attention'|valid|one of")),
    Case("unroll:step-kwargs-unknown", lambda: unfold.unroll(("attention",), depth=1, d=d, attention={"hedas": 2}),
         (r"hedas", r"(?i)heads|valid|unexpected")),
    Case("unroll:tied-str", lambda: unfold.unroll(("attention",), depth=1, d=d, tied="no"), (arg("tied"), r"bool")),
])
add(tensor_cases("Unrolled.forward", "Y", lambda y: body()(y), Y32,
                 kinds=("list", "int", "bool", "nan", "inf", "meta", "rank", "zero")))
add([
    Case("Unrolled.forward:Y-float64-into-float32-model", lambda: body()(Y32.double()),
         (arg("Y"), r"float64|float32", r"(?i)cast|\.to\(")),
    Case("Unrolled.forward:Y-width", lambda: body()(Y32[..., :3]), (arg("Y"), r"(?i)width|shape", FIX)),
    Case("Unrolled.forward:Y-overflow", lambda: body()(Y32 * 1e30), (arg("Y"), r"(?i)overflow|scale|finite")),
    Case("UnrolledClassifier.forward:x-width", lambda: classifier()(torch.randn(2, 3, 5)),
         (r"`x`|\bx\b|`X`|input", r"(?i)width|shape|d_in")),
    Case("UnrolledClassifier:body-not-unrolled", lambda: unfold.UnrolledClassifier(nn.Linear(d, d)),
         (arg("body"), r"Unrolled")),
])

# --- steps --------------------------------------------------------------------------------------------------------
add([
    Case("AttentionStep:heads-not-dividing", lambda: unfold.AttentionStep(d, heads=3), (arg("heads"),
                                                                                        r"divi|k=|`k`")),
    Case("AttentionStep:heads=0", lambda: unfold.AttentionStep(d, heads=0), (arg("heads"), FIX)),
    enum_case("AttentionStep", "kernel", lambda v: unfold.AttentionStep(d, kernel=v)),
    enum_case("AttentionStep", "preconditioner", lambda v: unfold.AttentionStep(d, preconditioner=v)),
    Case("AttentionStep:kernel_kwargs-unknown", lambda: unfold.AttentionStep(d, kernel="power",
                                                                              kernel_kwargs={"q": 2.0}),
         (r"\bq\b", r"(?i)unexpected|valid|p\b")),
    Case("FFNStep:spectrum-reversed", lambda: unfold.FFNStep(d, spectrum=(0.9, 0.1)), (arg("spectrum"), FIX)),
    Case("FFNStep:spectrum-above-1", lambda: unfold.FFNStep(d, spectrum=(0.0, 2.0)), (arg("alpha"), FIX),
         warns=StepSizeWarning),  # the step-size policy: a warning (an error in energy.strict_mode)
    Case("TiedReLUFFNStep:hidden=0", lambda: unfold.TiedReLUFFNStep(d, hidden=0), (arg("hidden"), FIX)),
    Case("LayerNormProjection:eps-neg", lambda: unfold.LayerNormProjection(d, eps=-1.0), (arg("eps"), FIX)),
    Case("RMSNormProjection:eps-nan", lambda: unfold.RMSNormProjection(d, eps=math.nan), (arg("eps"), FIX)),
    Case("HopfieldStep:patterns=0", lambda: unfold.HopfieldStep(d, patterns=0), (arg("patterns"), FIX)),
    Case("HopfieldStep:beta=0", lambda: unfold.HopfieldStep(d, beta=0.0), (arg("beta"), FIX)),
    Case("EnergyTransformerStep:heads=0", lambda: unfold.EnergyTransformerStep(d, heads=0), (arg("heads"), FIX)),
    Case("ReLUProjection:d=0", lambda: unfold.ReLUProjection(0), (arg("d"), FIX)),
    enum_case("make_kernel", "kernel", lambda v: unfold.make_kernel(v)),
])
add(scalar_cases("AttentionStep", "alpha", lambda v: unfold.AttentionStep(d, alpha=v),
                 bad=(("nan", math.nan), ("inf", math.inf), ("neg", -1.0), ("str", "1"))))
add(scalar_cases("Step", "d", lambda v: unfold.FFNStep(v), bad=(("zero", 0), ("float", 2.5), ("bool", True))))

# --- parametrizations ----------------------------------------------------------------------------------------------
add([
    Case("PSDMetric:k=0", lambda: unfold.PSDMetric(0), (arg("k"), FIX)),
    Case("PSDMetric:scale-neg", lambda: unfold.PSDMetric(2, scale=-1.0), (arg("scale"), FIX)),
    Case("SpectrumClip:lo>hi", lambda: unfold.SpectrumClip(0.9, 0.1), (r"lo|hi", FIX)),
    Case("SpectrumClip:hi-nan", lambda: unfold.SpectrumClip(0.0, math.nan), (arg("hi"), FIX)),
    Case("OrthogonalHeads:heads·k>d", lambda: unfold.OrthogonalHeads(3, 4, 2), (r"heads|\bk\b|\bd\b", FIX)),
    Case("OrthogonalHeads:heads=0", lambda: unfold.OrthogonalHeads(0, 4, 2), (arg("heads"), FIX)),
    Case("check_constraints:not-a-module", lambda: unfold.check_constraints("model"), (arg("module"), r"Module")),
])

# --- presets ---------------------------------------------------------------------------------------------------------
add([
    Case("yang2022:n_classes=0", lambda: unfold.yang2022(d=d, depth=1, n_classes=0), (arg("n_classes"), FIX)),
    Case("yang2022:d_in=0", lambda: unfold.yang2022(d=d, depth=1, d_in=0), (arg("d_in"), FIX)),
    Case("yang2022:d=0", lambda: unfold.yang2022(d=0, depth=1), (arg("d"), FIX)),
    Case("yang2022:depth=-1", lambda: unfold.yang2022(d=d, depth=-1), (arg("depth"), FIX)),
    Case("yang2022:heads-not-dividing", lambda: unfold.yang2022(d=d, depth=1, heads=3), (arg("heads"), r"divi")),
    Case("yang2022:alpha_att-nan", lambda: unfold.yang2022(d=d, depth=1, alpha_att=math.nan),
         (arg("alpha_att"), FIX)),
    Case("energy_transformer_block:heads=0", lambda: unfold.energy_transformer_block(d=d, depth=1, heads=0),
         (arg("heads"), FIX)),
    Case("energy_transformer_block:n_classes=-1", lambda: unfold.energy_transformer_block(d=d, depth=1, heads=1,
                                                                                          n_classes=-1),
         (arg("n_classes"), FIX)),
    Case("init_signal_preserving_:ffn_band-reversed", lambda: unfold.init_signal_preserving_(
        unfold.yang2022(d=d, depth=1), ffn_band=(0.95, 0.85)), (arg("ffn_band"), FIX)),
    Case("init_signal_preserving_:not-a-classifier", lambda: unfold.init_signal_preserving_(nn.Linear(2, 2)),
         (arg("model"), r"UnrolledClassifier")),
    Case("parameter_count:not-a-module", lambda: unfold.parameter_count([1, 2]), (arg("model"), r"Module")),
])

# --- converters -----------------------------------------------------------------------------------------------------
MHA = nn.MultiheadAttention(d, 2, batch_first=True).double()


def _mha_ok() -> nn.MultiheadAttention:
    """A layer that satisfies the energy constraints (so that only the bad argument is wrong)."""
    torch.manual_seed(0)
    return unfold.to_standard(unfold.AttentionStep(d))
add([
    Case("check_layer:causal-str", lambda: unfold.check_layer(MHA, causal="yes"), (arg("causal"), FIX)),
    Case("check_layer:TransformerDecoderLayer", lambda: unfold.check_layer(
        nn.TransformerDecoderLayer(d, 2, dim_feedforward=8)), (arg("layer"), r"self_attn")),
    Case("check_layer:Linear", lambda: unfold.check_layer(nn.Linear(d, d)), (arg("layer"), r"MultiheadAttention")),
    enum_case("check_layer", "preconditioner", lambda v: unfold.check_layer(MHA, preconditioner=v)),
    enum_case("check_layer", "value", lambda v: unfold.check_layer(MHA, value=v)),
    Case("check_layer:rtol-neg", lambda: unfold.check_layer(MHA, rtol=-1.0), (arg("rtol"), FIX)),
    Case("to_energy:str", lambda: unfold.to_energy("mha"), (arg("layer"), r"MultiheadAttention")),
    Case("to_energy:alpha-nan", lambda: unfold.to_energy(_mha_ok(), alpha=math.nan), (arg("alpha"), FIX)),
    Case("from_mha:Linear", lambda: unfold.from_mha(nn.Linear(d, d)), (arg("layer"), r"MultiheadAttention")),
    Case("to_standard:tensor", lambda: unfold.to_standard(Y32),
         (arg("energy_or_step") + r"|expected an AttentionEnergy", r"(?i)energy|step")),
    Case("skip_map:str", lambda: unfold.skip_map("x"), (arg("energy_or_step") + r"|expected an AttentionEnergy",
                                                        r"(?i)energy|step")),
    Case("key_bias_mask:Y-int", lambda: unfold.key_bias_mask(Y32.long(), unfold.AttentionStep(d)),
         (arg("Y"), r"float")),
    Case("standard_step:Y-nan", lambda: unfold.standard_step(MHA, with_nan(Y32.double()), unfold.AttentionStep(d)
                                                             .double()), (arg("Y"), r"(?i)nan|finite")),
    Case("verify_equivalence:Y-width", lambda: unfold.verify_equivalence(MHA, unfold.AttentionStep(d).double(),
                                                                         Y32.double()[..., :3]),
         (arg("Y"), r"(?i)width|shape")),
    Case("AttentionWeights:num_heads=0", lambda: unfold.AttentionWeights(*(4 * [torch.eye(d)]), num_heads=0),
         (arg("num_heads"), FIX)),
])

# --- standard models ------------------------------------------------------------------------------------------------
add([
    Case("GPT2Config:d_model=0", lambda: unfold.GPT2Config(d_model=0, n_layers=1), (arg("d_model"), FIX)),
    Case("GPT2Config:n_heads-not-dividing", lambda: unfold.GPT2Config(d_model=6, n_layers=1, n_heads=4),
         (arg("n_heads"), r"divi|d_head")),
    Case("GPT2Config:n_layers-neg", lambda: unfold.GPT2Config(d_model=4, n_layers=-1), (arg("n_layers"), FIX)),
    Case("GPT2Decoder:tokens-out-of-vocab", lambda: unfold.GPT2Decoder(unfold.GPT2Config(4, 1))(
        torch.full((1, 18), 99)), (r"(?i)token|vocab", r"(?i)range|vocab")),
    Case("GPT2Decoder:tokens-float", lambda: unfold.GPT2Decoder(unfold.GPT2Config(4, 1))(torch.zeros(1, 18)),
         (r"(?i)token|input", r"(?i)integer|long|int")),
    enum_case("MLPBaseline", "activation", lambda v: unfold.MLPBaseline(4, 1, activation=v), bad="tanh"),
    Case("standard_encoder:n_heads-not-dividing", lambda: unfold.standard_encoder(6, 1, 4), (arg("n_heads"),
                                                                                            r"divi")),
    Case("StandardEncoderClassifier:n_classes=0", lambda: unfold.StandardEncoderClassifier(4, 1, 1, 0),
         (arg("n_classes"), FIX)),
])

# --- data ------------------------------------------------------------------------------------------------------------
add([
    Case("load_digits_sequences:dtype-long", lambda: data.load_digits_sequences(dtype=torch.long),
         (arg("dtype"), r"float")),
    enum_case("load_digits_sequences", "tokens", lambda v: data.load_digits_sequences(tokens=v), bad="cols"),
    Case("load_digits_sequences:test_fraction=1.5", lambda: data.load_digits_sequences(test_fraction=1.5),
         (arg("test_fraction"), FIX)),
    Case("load_digits_sequences:test_fraction=0", lambda: data.load_digits_sequences(test_fraction=0.0),
         (arg("test_fraction"), FIX)),
    Case("synthetic_sequence_classification:n_classes=1", lambda: data.synthetic_sequence_classification(
        8, 8, n_classes=1), (arg("n_classes"), FIX)),
    Case("synthetic_sequence_classification:n_tokens=0", lambda: data.synthetic_sequence_classification(
        8, 8, n_tokens=0), (arg("n_tokens"), FIX)),
    Case("synthetic_sequence_classification:d=0", lambda: data.synthetic_sequence_classification(8, 8, d=0),
         (arg("d"), FIX)),
    Case("synthetic_sequence_classification:n_train=-1", lambda: data.synthetic_sequence_classification(-1, 8),
         (arg("n_train"), FIX)),
    Case("ShuffledBatches:batch_size=0", lambda: data.ShuffledBatches(Y32, torch.zeros(2), 0, seed=0),
         (arg("batch_size"), FIX)),
    Case("ShuffledBatches:length-mismatch", lambda: data.ShuffledBatches(Y32, torch.zeros(3), 1, seed=0),
         (r"`X`|`y`|\bX\b|\by\b", r"(?i)length|same|rows|match")),
    Case("iterate_batches:batch_size-neg", lambda: list(data.iterate_batches(Y32, torch.zeros(2), -1)),
         (arg("batch_size"), FIX)),
    Case("addition_batch:batch_size=0", lambda: data.addition_batch(0, generator=torch.Generator()),
         (arg("batch_size"), FIX)),
    Case("addition_batch:n_digits=0", lambda: data.addition_batch(2, generator=torch.Generator(), n_digits=0),
         (arg("n_digits"), FIX)),
    Case("addition_batch:carry_rich_rate=2", lambda: data.addition_batch(2, generator=torch.Generator(),
                                                                         carry_rich=True, carry_rich_rate=2.0),
         (arg("carry_rich_rate"), FIX)),
    Case("encode_addition:negative", lambda: data.encode_addition([-1], [2]), (r"`a`|\ba\b", FIX)),
    Case("encode_addition:too-many-digits", lambda: data.encode_addition([10**6], [2]), (r"`a`|\ba\b|n_digits",
                                                                                        FIX)),
    Case("decode_addition:tokens-length", lambda: data.decode_addition(torch.zeros(1, 5, dtype=torch.long)),
         (arg("tokens"), r"(?i)length|shape")),
    Case("addition_loss:targets-shape", lambda: data.addition_loss(torch.zeros(2, 18, 12), torch.zeros(2, 5).long()),
         (arg("targets"), r"shape")),
    Case("AdditionDataset:carry_rich_fraction=2", lambda: data.AdditionDataset(2, seed=0, carry_rich_fraction=2.0),
         (arg("carry_rich_fraction"), FIX)),
    Case("load_glove:missing", lambda: data.load_glove(F.missing()), (path_re(F.missing()), FILE_FIX),
         exc=FILE_EXC),
    Case("load_glove:directory", lambda: data.load_glove(F.directory()), (path_re(F.directory()), FILE_FIX),
         exc=FILE_EXC),
    Case("load_glove:empty", lambda: data.load_glove(F.empty()), (path_re(F.empty()), FILE_FIX), exc=FILE_EXC),
    Case("load_glove:nan-entry", lambda: data.load_glove(_glove("the nan 1.0\nof 0.5 0.5\n")),
         (r"glove_nan|line 1", r"(?i)nan|finite")),
    Case("load_glove:ragged", lambda: data.load_glove(_glove("the 1.0 2.0\nof 0.5\n", "ragged")),
         (r"glove_ragged|line 2", r"(?i)expected|dimension|entries")),
    Case("load_glove:max_words=0", lambda: data.load_glove(_glove("the 1.0 2.0\n", "ok"), max_words=0),
         (arg("max_words"), FIX)),
    Case("load_glove:dtype-long", lambda: data.load_glove(_glove("the 1.0 2.0\n", "ok"), dtype=torch.long),
         (arg("dtype"), r"float")),
    Case("load_imdb:missing", lambda: data.load_imdb(F.missing()), (path_re(F.missing()), FILE_FIX), exc=FILE_EXC),
    enum_case("load_imdb", "split", lambda v: data.load_imdb(F.directory(), split=v)),
    Case("load_sst2:missing", lambda: data.load_sst2(F.missing()), (path_re(F.missing()), FILE_FIX), exc=FILE_EXC),
    enum_case("load_sst2", "split", lambda v: data.load_sst2(F.directory(), split=v)),
    Case("embed_sentences:max_len=0", lambda: data.embed_sentences(["a b"], data.seeded_embedding_table(
        ["a", "b"], 2, 0), 0), (arg("max_len"), FIX)),
    Case("seeded_embedding_table:d=0", lambda: data.seeded_embedding_table(["a"], 0, 0), (arg("d"), FIX)),
    Case("WordVectors:length-mismatch", lambda: data.WordVectors(["a", "b"], torch.zeros(3, 2)),
         (r"words|vectors", r"(?i)rows|length|match|shape")),
    Case("zipf_sentences:n_sentences-neg", lambda: data.zipf_sentences(-1), (arg("n_sentences"), FIX)),
])


def _glove(text: str, tag: str = "nan") -> str:
    p = F.tmp() / f"glove_{tag}.txt"
    p.write_text(text)
    return str(p)


# --- train / evaluate ---------------------------------------------------------------------------------------------
def _batches(y: torch.Tensor | None = None, x: torch.Tensor | None = None):
    x = torch.randn(4, 2, 3) if x is None else x
    y = torch.tensor([0, 1, 0, 1]) if y is None else y
    while True:
        yield x, y


def _train(**kw: object) -> object:
    args: dict = {"steps": 1, "lr": 1e-3, "progress": False}
    args.update(kw)
    batches = args.pop("batches", _batches())
    return unfold.train.train(classifier(), nn.functional.cross_entropy, batches, **args)


add(scalar_cases("train", "steps", lambda v: _train(steps=v), bad=(("zero", 0), ("neg", -1), ("float", 1.5))))
add(scalar_cases("train", "lr", lambda v: _train(lr=v), bad=(("nan", math.nan), ("neg", -1.0), ("zero", 0.0))))
add([
    enum_case("train", "optimizer", lambda v: _train(optimizer=v), bad="adamw"),
    Case("train:targets-out-of-range", lambda: _train(batches=_batches(torch.tensor([0, 5, 0, 1]))),
         (r"(?i)target|class|label", r"(?i)range|n_classes|\b2\b")),
    Case("train:inputs-float64", lambda: _train(batches=_batches(x=torch.randn(4, 2, 3, dtype=f64))),
         (r"(?i)input|`Y`|`x`", r"(?i)float32|cast|\.to\(")),
    Case("train:batches-empty", lambda: _train(batches=iter([])), (arg("batches"), r"(?i)ran out|empty|at least")),
    Case("train:loss_fn-not-callable", lambda: unfold.train.train(classifier(), "ce", _batches(), steps=1, lr=1e-3,
                                                                  progress=False), (arg("loss_fn"), r"callable")),
    Case("train:checkpoint-directory", lambda: _train(checkpoint=F.directory()), (r"a_directory|checkpoint",
                                                                                  FILE_FIX), exc=FILE_EXC),
    Case("train:checkpoint-0-byte", lambda: _train(checkpoint=F.empty()), (r"empty\.pt|checkpoint", FILE_FIX),
         exc=FILE_EXC),
    Case("train:checkpoint-corrupt", lambda: _train(checkpoint=F.corrupt()), (r"corrupt\.pt|checkpoint", FILE_FIX),
         exc=FILE_EXC),
    Case("train:checkpoint-under-a-file", lambda: _train(checkpoint=F.under_a_file("ck.pt")),
         (r"plain_file|checkpoint", FILE_FIX), exc=FILE_EXC),
    Case("train:checkpoint_every=0", lambda: _train(checkpoint=F.tmp() / "ck0.pt", checkpoint_every=0),
         (arg("checkpoint_every"), FIX)),
    Case("evaluate:batches-empty", lambda: unfold.evaluate(classifier(), []), (arg("batches"),
                                                                              r"(?i)empty|at least|no batch")),
])

# --- model files ------------------------------------------------------------------------------------------------------
add([
    Case("load_model:missing", lambda: unfold.load_model(F.missing()), (path_re(F.missing()), FILE_FIX),
         exc=FILE_EXC),
    Case("load_model:directory", lambda: unfold.load_model(F.directory()), (path_re(F.directory()), FILE_FIX),
         exc=FILE_EXC),
    Case("load_model:0-byte", lambda: unfold.load_model(F.empty()), (path_re(F.empty()), FILE_FIX), exc=FILE_EXC),
    Case("load_model:corrupt", lambda: unfold.load_model(F.corrupt()), (path_re(F.corrupt()), FILE_FIX),
         exc=FILE_EXC),
    Case("load_model:json", lambda: unfold.load_model(F.json_file()), (path_re(F.json_file()), FILE_FIX),
         exc=FILE_EXC),
    Case("load_model:plain-state-dict", lambda: unfold.load_model(_plain_state_dict()),
         (r"plain_state", r"(?i)save_model|model file|builder")),
    Case("load_model:path-int", lambda: unfold.load_model(3), (arg("path"), r"(?i)str|path")),
    Case("save_model:under-a-file", lambda: unfold.save_model(classifier(), F.under_a_file()),
         (r"plain_file", FILE_FIX), exc=FILE_EXC),
    Case("save_model:not-a-module", lambda: unfold.save_model({"w": 1}, F.tmp() / "x.pt"),
         (r"dict|model", r"instead|Module")),
    Case("read_model_file:0-byte", lambda: modelfile.read_model_file(F.empty()), (path_re(F.empty()), FILE_FIX),
         exc=FILE_EXC),
    Case("safe_load_state_dict:wrong-keys", lambda: unfold.safe_load_state_dict(classifier(), {"nope": torch.ones(1)}),
         (r"nope|missing|unexpected", r"(?i)missing|unexpected|expected")),
    Case("register_builder:not-callable", lambda: unfold.register_builder("x", 3), (r"from_config|builder",
                                                                                  r"callable")),
])


def _plain_state_dict() -> str:
    p = F.tmp() / "plain_state.pt"
    torch.save(classifier().state_dict(), p)
    return str(p)


# --- paper_figs registry / io -----------------------------------------------------------------------------------------
add([
    Case("Registry.select:unknown", lambda: preg.Registry().select(["nope"]), (r"nope", r"(?i)valid|--list|known"),
         exc=(KeyError, ValueError)),
    Case("FigureConfig:fidelity", lambda: preg.FigureConfig(fidelity="fast"), (arg("fidelity"), r"'quick'")),
    Case("FigureConfig:seed-str", lambda: preg.FigureConfig(seed="0"), (arg("seed"), r"int")),
    Case("measured:tolerance-neg", lambda: preg.measured(1.0, target=1.0, tolerance=-1.0), (arg("tolerance"), FIX)),
    Case("read_json:missing", lambda: pio.read_json(F.missing()), (path_re(F.missing()), FILE_FIX), exc=FILE_EXC),
    Case("read_json:corrupt", lambda: pio.read_json(F.corrupt_json()), (path_re(F.corrupt_json()), FILE_FIX),
         exc=FILE_EXC),
    Case("read_json:directory", lambda: pio.read_json(F.directory()), (path_re(F.directory()), FILE_FIX),
         exc=FILE_EXC),
    Case("write_json:under-a-file", lambda: pio.write_json(F.under_a_file("x.json"), {}), (r"plain_file", FILE_FIX),
         exc=FILE_EXC),
    Case("write_json:not-jsonable", lambda: pio.write_json(F.tmp() / "x.json", {"a": object()}),
         (r"(?i)object|json", r"(?i)serializ|convert|jsonable|return")),
    Case("decode_array:bad-record", lambda: pio.decode_array({"shape": [2]}), (r"(?i)record|dtype|data",
                                                                               r"(?i)expected|missing|encode_array"),
         exc=(ValueError, TypeError, KeyError)),
    Case("save_figure:not-a-figure", lambda: pio.save_figure("fig", F.tmp() / "x.png"), (arg("fig"), r"(?i)figure")),
])
