"""In-place conversion of transformers models: identical logits, same gradients when nothing
is compressed, saved bytes per token per layer against the expected formula, round trip."""

from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch
import transformers as T
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import slimfit
from slimfit.convert import ConversionReport, convert, is_converted, restore
from slimfit.ops.config import CompressionConfig

H, I, HEADS = 64, 128, 4  # noqa: E741


def tiny(kind: str, layers: int = 2, dropout: float = 0.0):
    common = dict(
        hidden_size=H, num_attention_heads=HEADS, intermediate_size=I, num_hidden_layers=layers
    )
    drop = dict(hidden_dropout_prob=dropout, attention_probs_dropout_prob=0.0)
    if kind == "bert":
        return T.BertForSequenceClassification(
            T.BertConfig(vocab_size=100, max_position_embeddings=32, **common, **drop)
        )
    if kind == "bert_qa":
        return T.BertForQuestionAnswering(
            T.BertConfig(vocab_size=100, max_position_embeddings=32, **common, **drop)
        )
    if kind == "roberta":
        return T.RobertaForSequenceClassification(
            T.RobertaConfig(vocab_size=100, max_position_embeddings=40, **common, **drop)
        )
    if kind == "distilbert":
        return T.DistilBertForSequenceClassification(T.DistilBertConfig(
            vocab_size=100, max_position_embeddings=32, dim=H, n_heads=HEADS, hidden_dim=I, n_layers=layers,
            dropout=dropout, attention_dropout=0.0, seq_classif_dropout=dropout))  # fmt: skip
    if kind == "vit":
        return T.ViTForImageClassification(
            T.ViTConfig(image_size=16, patch_size=4, num_labels=3, **common, **drop)
        )
    if kind == "deit":
        return T.DeiTForImageClassification(
            T.DeiTConfig(image_size=16, patch_size=4, num_labels=3, **common, **drop)
        )
    if kind == "llama":
        return T.LlamaForCausalLM(
            T.LlamaConfig(
                vocab_size=100, num_key_value_heads=2, max_position_embeddings=32, **common
            )
        )
    raise KeyError(kind)  # fmt: skip


def batch_for(kind: str, B: int = 2, S: int = 12):
    g = torch.Generator().manual_seed(1)
    if kind in ("vit", "deit"):
        return {"pixel_values": torch.randn(B, 3, 16, 16, generator=g)}
    mask = torch.ones(B, S, dtype=torch.long)
    mask[-1, S - 4 :] = 0  # padding: the mask must reach the attention function
    return {"input_ids": torch.randint(3, 100, (B, S), generator=g), "attention_mask": mask}


def logits(model, batch):
    out = model(**batch)
    return out.start_logits if hasattr(out, "start_logits") else out.logits


def _double(batch: dict) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def step(model, batch):
    out = logits(model, batch)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


MODELS = ["bert", "bert_qa", "roberta", "distilbert", "vit", "deit", "llama"]


@pytest.mark.parametrize("kind", MODELS)
def test_converted_model_same_logits_and_gradients(kind):
    torch.manual_seed(0)
    model = tiny(kind).train()
    batch = batch_for(kind)
    ref, ref_grads = step(model, batch)
    with torch.no_grad():
        ref_eval = logits(model.eval(), batch)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    report = convert(model, "none")  # converted modules, nothing compressed: exact
    out, grads = step(model, batch)
    assert torch.equal(out, ref)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name
    restore(model)

    report = convert(model, "default")
    assert report.converted["linear"] > 0
    assert report.attention.endswith(
        "(Q, K, V rebuilt from their LayerNorm's code, else Q, K, V int8)"
    )
    out, grads = step(model, batch)
    assert torch.equal(out, ref)  # nothing in the forward is quantized
    with torch.no_grad():
        assert torch.equal(logits(model.eval(), batch), ref_eval)
    model.train()
    for name, g in grads.items():
        r = ref_grads[name]
        if r.norm() > 1e-6 * max(
            1.0, ref_grads[name].numel() ** 0.5
        ):  # skip structural zeros (key bias)
            cos = torch.nn.functional.cosine_similarity(
                g.flatten().double(), r.flatten().double(), 0
            )
            assert cos > 0.95, (name, cos.item())
    restore(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_round_trip_restores_classes_state_dict_and_attention():
    torch.manual_seed(0)
    model = tiny("bert")
    classes = {n: type(m) for n, m in model.named_modules()}
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict().keys())
    report = convert(model, "paper")
    assert is_converted(model) and model.config._attn_implementation == "slimfit_sdpa"
    assert list(model.state_dict().keys()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    lin = model.bert.encoder.layer[0].intermediate.dense
    assert isinstance(lin, nn.Linear) and type(lin) is not nn.Linear
    # a converted model's state_dict loads into a plain transformers model
    plain = tiny("bert")
    plain.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="already converted"):
        convert(model, "default")
    with pytest.raises(ValueError, match="already converted"):
        convert(model.bert.encoder, "default")  # a part of a converted model
    restore(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert model.config._attn_implementation == "sdpa" and not is_converted(model)
    assert not any(k.startswith("_slimfit") for m in model.modules() for k in vars(m))
    with pytest.raises(ValueError, match="not converted"):
        restore(model)
    assert isinstance(report, ConversionReport)


@pytest.mark.parametrize("kind", MODELS)
def test_ffn_out_scope_finds_one_linear_per_layer(kind):
    torch.manual_seed(0)
    model = tiny(kind)
    convert(model, CompressionConfig(linear_scope="ffn_out"))
    flagged = [n for n, m in model.named_modules() if getattr(m, "_slimfit_compress", False)]
    assert len(flagged) == 2, flagged  # two layers: output.dense / ffn.lin2 / mlp.fc2 / down_proj


def test_llama_gated_mlp_and_rmsnorm_are_converted():
    torch.manual_seed(0)
    report = convert(tiny("llama"), "default")
    assert report.converted["gated_mlp:silu"] == 2 and report.converted["rmsnorm"] == 5


def test_converted_model_pickles_and_deepcopies():
    import copy
    import io

    torch.manual_seed(0)
    model = tiny("bert").train()
    convert(model, "default")
    batch = batch_for("bert")
    ref = logits(model, batch)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (torch.load(buf, weights_only=False), copy.deepcopy(model)):
        out = logits(other, batch)
        assert torch.equal(out, ref) and type(out.grad_fn).__name__ != "ViewBackward0"
        assert other.config._attn_implementation == "slimfit_sdpa"
        restore(other)
        assert type(other.bert.encoder.layer[0].output.dense) is nn.Linear


def test_report_lists_what_was_not_converted():
    torch.manual_seed(0)
    report = convert(tiny("vit"), "default")
    text = str(report)
    assert report.converted == {"linear": 13, "layernorm": 5, "activation:gelu": 2, "dropout": 3}
    assert [u[1] for u in report.unconverted] == ["Conv2d"] and "Conv2d x1" in text
    assert "slimfit_sdpa" in text
    eager = tiny("bert", layers=1)
    eager.set_attn_implementation("eager")
    report = convert(eager, "default")
    assert "'eager' kept" in report.attention and eager.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="unknown compression preset"):
        convert(tiny("bert"), "fast")


# -- saved bytes per token per layer ---------------------------------------------------------
def _saved_bytes(model, batch) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = logits(model, batch)
    out.sum().backward()
    return sum(seen.values())


def _layer_bytes(cfg, trainable=False, B=2, S=16) -> int:
    """Bytes autograd keeps for one BERT layer: (2-layer model) - (1-layer model).

    Weights (and norm gains) frozen, biases trainable, as under SlimFit; hidden dropout on."""
    sizes = []
    for layers in (1, 2):
        torch.manual_seed(0)
        model = tiny("bert", layers=layers, dropout=0.1).train()
        for name, p in model.named_parameters():
            p.requires_grad_(
                name.endswith("bias") or (trainable and p.dim() == 2 and "embeddings" not in name)
            )
        convert(model, cfg)
        batch = batch_for("bert", B, S)
        batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
        sizes.append(_saved_bytes(model, batch))
    return sizes[1] - sizes[0]


def q8_block(n: int, block: int = 64) -> int:
    nb = math.ceil(n / block)
    return nb * block + 4 * nb


def test_saved_bytes_per_layer_default():
    T_ = 2 * 16  # tokens
    expect = (
        2 * (q8_block(T_ * H) + 4 * T_)  # 2 frozen LayerNorms: int8 y + fp32 rstd per row
        + T_ * I // 2
        + 4 * T_ * I // 64  # GELU input, 4 bits + fp32 scale per 64
    )  # frozen linears: nothing; Q, K, V: nothing (rebuilt from the norm's code, no lse);
    # the 2 dropouts: nothing (in the residual tails' nodes, their seeds are Python ints)
    assert _layer_bytes("default") == expect
    # frozen linears keep no input whatever linear_bits says
    assert _layer_bytes(CompressionConfig(linear_bits=None)) == expect
    # about 3.4 bytes per token per hidden unit at H=64, vs 2 x 4 x (7H + 2I) in fp32 as is
    assert expect / T_ / H < 3.4


def test_saved_bytes_per_layer_paper():
    T_ = 2 * 16
    k = math.ceil(0.1 * H)
    expect = (
        3 * T_ * H  # Q, K, V fixed-point int8, no scales
        + 2 * (T_ * k * (2 + 2) + 4 * T_)  # top-10%: fp16 values + int16 indices, rstd
        + T_ * I // 2  # GELU 4-bit fixed point
        + 2 * T_ * H * 4  # dropout as is: its mask (fp32 on CPU; CUDA keeps a bool mask)
    )
    assert _layer_bytes("paper") == expect


def test_saved_bytes_per_layer_trainable_linears_int8():
    T_ = 2 * 16
    frozen = _layer_bytes("default")
    # Q, K, V (fed by the previous layer's output LayerNorm) and FFN-in (fed by the attention
    # output LayerNorm) keep nothing: they share the norms' int8 codes. The attention-output
    # input and the FFN-out input (the GELU output) are kept as int8.
    assert _layer_bytes("default", trainable=True) - frozen == q8_block(T_ * H) + q8_block(T_ * I)
    # the paper's scope: only the FFN-out input is int8, the others keep their fp32 input
    ffn_out = CompressionConfig(linear_scope="ffn_out")
    assert _layer_bytes(ffn_out, trainable=True) - frozen == q8_block(T_ * I) + 3 * T_ * H * 4


def test_saved_bytes_per_layer_attention_recompute():
    """By default (attention_recompute where possible) the second layer's Q, K, V
    (projections of the first layer's output LayerNorm) keep nothing: backward rebuilds them
    from that norm's int8 code. attention_recompute=False keeps their int8 codes."""
    T_ = 2 * 16
    codes = CompressionConfig(attention_recompute=False)
    assert _layer_bytes(codes) - _layer_bytes("default") == 3 * q8_block(T_ * H)
    trained = _layer_bytes(codes, trainable=True) - _layer_bytes("default", trainable=True)
    assert trained == 3 * q8_block(T_ * H)


@pytest.mark.parametrize("kind", ["bert", "vit", "llama"])
def test_attention_recompute_same_forward_gradients_near_float64(kind):
    """The forward is unchanged; gradients stay as close to a float64 run as with the Q, K, V
    codes (LLaMA's rotary embeddings sit between projection and attention: codes are kept)."""
    torch.manual_seed(0)
    model = tiny(kind).train()
    batch = batch_for(kind)
    ref64, grads64 = step(copy.deepcopy(model).double(), _double(batch))
    errors = {}
    for cfg in (CompressionConfig(attention_recompute=False), "default"):
        convert(model, cfg)
        out, grads = step(model, batch)
        assert torch.allclose(out.double(), ref64, atol=1e-5)
        errors[str(cfg)[:20]] = err = {
            n: rel_err(g, grads64[n]) for n, g in grads.items() if grads64[n].norm() > 1e-6
        }
        assert max(err.values()) < 0.1, max(err, key=err.get)
        restore(model)
    default, recompute = errors.values()
    assert sum(recompute.values()) < 1.5 * sum(default.values()) + 1e-3
    # under bf16 autocast too: the same forward, gradients aligned with the codes' path
    runs = []
    for cfg in (CompressionConfig(attention_recompute=False), "default"):
        convert(model, cfg)
        with torch.autocast("cpu", torch.bfloat16):
            runs.append(step(model, batch))
        restore(model)
    (out_a, grads_a), (out_b, grads_b) = runs
    assert torch.equal(out_a, out_b)
    for name, g in grads_b.items():
        if grads64[name].norm() > 1e-6:  # not a structural zero (the key bias)
            cos = torch.nn.functional.cosine_similarity(
                g.flatten().double(), grads_a[name].flatten().double(), 0
            )
            assert cos > 0.99, (name, cos.item())


def test_attach_converts_and_detach_restores():
    torch.manual_seed(0)
    model = tiny("bert")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sf = slimfit.attach(model, opt, slimfit.SlimFitConfig(freeze_ratio=0.5, compression="default"))
    assert is_converted(model)
    batch = batch_for("bert")
    logits(model, batch).square().sum().backward()
    opt.step()
    opt.zero_grad()
    sf.detach()
    assert (
        not is_converted(model)
        and type(model.bert.encoder.layer[0].intermediate.dense) is nn.Linear
    )


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_converted_model_runs_on_meta(kind):
    """Shape-only simulations (slimfit.plan) run converted models on the meta device."""
    with torch.device("meta"):
        model = tiny(kind).train()
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("bias") or ".0." in name or "classifier" in name)
    convert(model, "default")
    out = logits(model, {"input_ids": torch.zeros(2, 12, dtype=torch.long, device="meta")})
    out.sum().backward()
    assert out.device.type == "meta"


@pytest.mark.parametrize("kind", ["bert", "roberta", "vit", "deit"])
def test_ffn_activation_overwrites_its_fresh_input_with_the_same_results(kind):
    """In BERT/ViT-style FFN blocks the activation's input is a linear's fresh output that
    nothing else reads: the lean activation writes its output into that buffer (one
    intermediate-sized buffer instead of two), bit for bit as out of place."""
    torch.manual_seed(0)
    model = tiny(kind).train()
    inplace = copy.deepcopy(model)
    convert(inplace, "default")
    marked = [n for n, m in inplace.named_modules() if m.__dict__.get("_slimfit_inplace")]
    assert len(marked) == 2 and all(n.endswith(("act_fn", "activation_fn")) for n in marked)
    plain = copy.deepcopy(model)
    convert(plain, "default")
    for m in plain.modules():
        m.__dict__.pop("_slimfit_inplace", None)
    batch = batch_for(kind)
    out_a, grads_a = step(inplace, batch)
    out_b, grads_b = step(plain, batch)
    assert torch.equal(out_a, out_b)
    assert grads_a.keys() == grads_b.keys()
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    # the output really lives in the input's buffer
    act = dict(inplace.named_modules())[marked[0]]
    seen = {}
    act.register_forward_hook(lambda m, args, out: seen.update(same=out is args[0]))
    logits(inplace, batch)
    assert seen["same"]
    restore(inplace)
    assert not any("_slimfit_inplace" in m.__dict__ for m in inplace.modules())


def test_activation_outside_known_ffn_blocks_stays_out_of_place():
    """A GELU whose input may be read elsewhere (any module slimfit does not recognise)
    never overwrites it."""
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 2))
    convert(model, "default")
    assert not any(m.__dict__.get("_slimfit_inplace") for m in model.modules())
    # transformers' explicit-formula GELU differs from aten's bit for bit: never in place
    from slimfit.ops.activation import same_as_inplace

    assert not same_as_inplace(T.activations.NewGELUActivation(), "gelu_tanh")
    assert same_as_inplace(nn.GELU(), "gelu")


@pytest.mark.parametrize("reentrant,together", [(False, False), (True, False), (False, True), (True, True)])  # fmt: skip
def test_converted_model_under_activation_checkpointing_same_gradients(
    reentrant, together, monkeypatch
):
    # the lean ops (custom autograd functions, int8 caches shared between ops) must compose
    # with transformers' activation checkpointing, reentrant or not (saved-tensor hooks);
    # `together`: with the biases cast in one node per forward, as slimfit.attach sets up
    linear_ops = importlib.import_module("slimfit.ops.linear")
    from slimfit.ops.linear import cast_biases_together, forget_bias_casts

    group_casts = []
    cast = linear_ops._cast_biases
    monkeypatch.setattr(linear_ops, "_cast_biases", lambda *a: group_casts.append(1) or cast(*a))

    torch.manual_seed(0)
    model = tiny("bert", dropout=0.0).train()
    convert(model, "default")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    biases = [model.get_submodule(n).bias for n in linears]
    if together:
        cast_biases_together(biases)
        model.register_forward_pre_hook(lambda *_: forget_bias_casts())
    for name, p in model.named_parameters():
        if "intermediate" in name or "attention.self" in name:
            p.requires_grad_(False)
    batch = batch_for("bert")
    with torch.autocast("cpu", torch.bfloat16):
        ref, ref_grads = step(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    with torch.autocast("cpu", torch.bfloat16):
        out, grads = step(model, batch)
    assert torch.equal(out, ref)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:  # not bitwise: a recomputed block quantizes its own copies again
        assert rel_err(grads[name], ref_grads[name]) < 1e-2, name
    trained = {f"{n}.bias" for n, b in zip(linears, biases) if b.requires_grad}
    assert len(trained) > 4 and trained <= grads.keys()  # no bias gradient lost
    assert len(group_casts) >= (2 if together else 0) and (together or not group_casts)
    forget_bias_casts(biases)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_post_norm_residual_tails_run_as_one_node_with_the_same_results(kind, monkeypatch):
    """BERT-style ``*SelfOutput`` / ``*Output`` (dense -> dropout -> + input -> LayerNorm)
    run dropout, add and norm as one node: a training step (dropout on, bf16 autocast) is
    bit for bit the step of the separate lean ops, from the same seed. A block whose
    forward differs is left to the separate ops; restore brings the classes back."""
    import sys

    conv = sys.modules["slimfit.convert"]  # the package's ``convert`` is the function
    torch.manual_seed(0)
    model = tiny(kind, dropout=0.2).train()
    fused, separate = copy.deepcopy(model), copy.deepcopy(model)
    report = convert(fused, "default")
    assert report.converted["residual_norm"] == 4  # two per layer
    names = report.names["residual_norm"]
    assert all(n.endswith(("attention.output", ".output")) for n in names)
    monkeypatch.setattr(conv, "_is_residual_norm", lambda mod: False)
    convert(separate, "default")
    monkeypatch.undo()
    batch = batch_for(kind)
    results = []
    for m in (fused, separate):
        torch.manual_seed(3)
        with torch.autocast("cpu", torch.bfloat16):
            results.append(step(m, batch))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    assert grads_a.keys() == grads_b.keys()
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)

    block = type(dict(model.named_modules())[names[0]])

    class Scaled(block):  # one more statement: not the recognised forward
        def forward(self, hidden_states, input_tensor):
            hidden_states = self.dense(hidden_states)
            hidden_states = self.dropout(hidden_states)
            hidden_states = self.LayerNorm(hidden_states + input_tensor)
            return hidden_states * 2

    Scaled.__module__ = block.__module__
    other = copy.deepcopy(model)
    dict(other.named_modules())[names[0]].__class__ = Scaled
    assert convert(other, "default").converted["residual_norm"] == 3
    restore(fused)
    assert [type(m) for m in fused.modules()] == [type(m) for m in model.modules()]


class _BoolReads(TorchDispatchMode):
    """Counts reads of a bool tensor's value to the host (``bool(t)``, ``t.item()``): what
    a data-dependent branch on a mask costs, a device synchronization on a GPU."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].dtype == torch.bool:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
def test_converted_forward_never_reads_the_padding_mask_back(kind):
    """Under ``"sdpa"`` transformers reads a padding mask back in every forward to decide
    whether to drop it (a device synchronization per step); the converted model's
    ``"slimfit_sdpa"`` builds and uses it unread. A padded batch gives bitwise the same
    logits as ``"sdpa"``; an all-ones mask (attended with the mask, not dropped) the same
    logits as no mask to fp32 rounding."""
    torch.manual_seed(0)
    model = tiny(kind).eval()
    padded = batch_for(kind)
    ones = dict(padded, attention_mask=torch.ones_like(padded["attention_mask"]))
    no_mask = {"input_ids": padded["input_ids"]}
    with torch.no_grad():
        reads = _BoolReads()
        with reads:
            ref_padded, ref_ones = logits(model, padded), logits(model, ones)
        assert reads.count >= 2  # the check this test would catch
        ref_none = logits(model, no_mask)
        convert(model, "default")
        reads = _BoolReads()
        with reads:
            out_padded, out_ones = logits(model, padded), logits(model, ones)
        assert reads.count == 0
        assert torch.equal(out_padded, ref_padded)
        torch.testing.assert_close(out_ones, ref_ones, rtol=1e-5, atol=1e-5)
        assert torch.equal(logits(model, no_mask), ref_none)
    restore(model)


def test_conversion_gives_the_model_its_own_config():
    """Models built from one config object share it (transformers keeps the object and
    reads the attention implementation from it in every forward): converting one must not
    switch the others to slimfit's attention, and a model built from that object later
    must not switch the converted one back to plain SDPA."""
    config = T.BertConfig(vocab_size=100, max_position_embeddings=32, hidden_size=H,
                          num_attention_heads=HEADS, intermediate_size=I, num_hidden_layers=2)  # fmt: skip
    config._attn_implementation = "sdpa"
    lean, other = T.BertForSequenceClassification(config), T.BertForSequenceClassification(config)
    assert lean.config is other.config
    convert(lean, "default")
    assert lean.config is not config and other.config._attn_implementation == "sdpa"
    holders = [m for m in lean.modules() if "config" in m.__dict__]
    assert len(holders) > 3 and all(m.config is lean.config for m in holders)
    T.BertForSequenceClassification(config)  # sets "sdpa" on the shared object again
    config._attn_implementation = "eager"
    assert lean.config._attn_implementation == "slimfit_sdpa"
    attn = lean.bert.encoder.layer[0].attention.self
    assert attn.config._attn_implementation == "slimfit_sdpa"
    restore(lean)
    assert lean.config._attn_implementation == "sdpa"


attach_module = importlib.import_module("slimfit.attach")


def _bert_run(
    monkeypatch,
    keep_casts: bool,
    fused: bool,
    steps: int = 8,
    bias_casts: bool = True,
    micro_batches: int = 1,
    counts: str = "weight_casts",
):
    """Train a tiny converted BERT under bf16 autocast with ILS (half the units frozen, the
    set moving every step); the final parameters and the casts (``counts``) made per step."""
    if not keep_casts:
        monkeypatch.setattr(attach_module, "keep_frozen_casts", lambda params: None)
    if not bias_casts:
        monkeypatch.setattr(attach_module, "cast_biases_together", lambda biases: None)
    torch.manual_seed(0)
    model = tiny("bert", layers=3).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    sf = slimfit.attach(model, opt, slimfit.SlimFitConfig(freeze_ratio=0.5, compression="default"))
    g = torch.Generator().manual_seed(1)
    casts = []
    for _ in range(steps):
        counter = _CastCounter()
        for _ in range(micro_batches):
            ids = torch.randint(0, 100, (4, 16), generator=g)
            with counter, torch.autocast("cpu", torch.bfloat16):
                loss = model(input_ids=ids, labels=torch.zeros(4, dtype=torch.long)).loss
            loss.backward()
        opt.step()
        opt.zero_grad()
        casts.append(getattr(counter, counts))
    sf.detach()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, casts


class _CastCounter(TorchDispatchMode):
    """Counts fp32 -> bf16 casts of 2-D tensors (weights) and of 1-D ones (biases)."""

    weight_casts = 0
    bias_casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].dim() in (1, 2):
            down = args[0].dtype == torch.float32 and kwargs.get("dtype") == torch.bfloat16
            if args[0].dim() == 2:
                self.weight_casts += down
            else:
                self.bias_casts += down
        return func(*args, **kwargs)


@pytest.mark.parametrize("fused", [False, True])
def test_frozen_weights_keep_their_casts_and_training_is_bit_identical(monkeypatch, fused):
    """Under ILS a frozen unit's linear keeps its weight's bf16 cast across steps, and the
    cast is made again once the unit trained: fused AdamW changes weights without moving
    their version counters, so a cast kept past a training step would train on stale
    weights. The run is bit-for-bit the run that casts every weight at every step."""
    kept, kept_casts = _bert_run(monkeypatch, True, fused)
    monkeypatch.undo()
    fresh, fresh_casts = _bert_run(monkeypatch, False, fused)
    assert all(torch.equal(kept[n], fresh[n]) for n in fresh)
    # the first step casts every weight; later steps only those that trained since their
    # last cast (all of them after the first two steps, which train every unit once)
    assert kept_casts[0] == fresh_casts[0]
    assert all(k <= f for k, f in zip(kept_casts, fresh_casts))
    assert sum(kept_casts[3:]) < 0.8 * sum(fresh_casts[3:])


@pytest.mark.parametrize("fused,micro_batches", [(False, 1), (True, 1), (True, 2)])
def test_biases_cast_together_train_bit_identically(monkeypatch, fused, micro_batches):
    """The converted linears' biases are cast in one node per forward (two kernels, not two
    ops and a node per linear): the run, gradient accumulation included, is bit for bit
    the run in which autocast casts every bias on its own."""
    run = dict(keep_casts=True, fused=fused, micro_batches=micro_batches, counts="bias_casts")
    together, together_casts = _bert_run(monkeypatch, **run)
    monkeypatch.undo()
    alone, alone_casts = _bert_run(monkeypatch, bias_casts=False, **run)
    assert all(torch.equal(together[n], alone[n]) for n in alone)
    # tiny BERT, 3 layers: 6 linears a layer plus the pooler and the head's dense layer
    # (each cast once a forward), against the single cast of all of them together
    assert together_casts == [micro_batches] * len(together_casts)
    assert all(c >= 18 * micro_batches for c in alone_casts)


def test_a_bias_cast_together_is_fresh_and_its_gradient_exact():
    """One call casts the whole group; an unused bias gets no gradient (None, as without
    the cast); a forget, an in-place edit or a change of requires_grad gives a fresh cast,
    and an unregistered bias is left to autocast."""
    from slimfit.ops.linear import bias_cast, cast_biases_together, forget_bias_casts

    b1, b2 = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(3))
    cast_biases_together([b1, b2])
    try:
        c1 = bias_cast(b1, torch.bfloat16)
        c2 = bias_cast(b2, torch.bfloat16)
        assert torch.equal(c1, b1.to(torch.bfloat16)) and torch.equal(c2, b2.to(torch.bfloat16))
        assert c1.grad_fn is c2.grad_fn and bias_cast(b1, torch.bfloat16) is c1
        weights = torch.linspace(-2, 2, 5, dtype=torch.bfloat16)
        (c1 * weights).sum().backward()
        assert b1.grad.dtype == torch.float32 and torch.equal(b1.grad, weights.float())
        assert b2.grad is None
        forget_bias_casts()
        assert bias_cast(b1, torch.bfloat16) is not c1
        c1 = bias_cast(b1, torch.bfloat16)
        with torch.no_grad():
            b1.mul_(2)
        again = bias_cast(b1, torch.bfloat16)
        assert again is not c1 and torch.equal(again, b1.to(torch.bfloat16))
        b2.requires_grad_(False)
        assert not bias_cast(b2, torch.bfloat16).requires_grad
    finally:
        forget_bias_casts([b1, b2])
    assert bias_cast(b1, torch.bfloat16) is b1


def test_a_kept_cast_follows_every_change_of_its_weight():
    """In-place edits (version counter), a swapped storage (``.data =``, ``.to()``), a
    step as a trained weight, ``forget_frozen_casts`` and a copy each give a fresh cast."""
    from slimfit.ops.linear import forget_frozen_casts, frozen_cast, keep_frozen_casts

    w = nn.Parameter(torch.randn(8, 8), requires_grad=False)
    keep_frozen_casts([w])
    first = frozen_cast(w, torch.bfloat16)
    assert frozen_cast(w, torch.bfloat16) is first and torch.equal(first, w.to(torch.bfloat16))
    twin = copy.deepcopy(w)  # a copy of the model does not take the cast along
    assert frozen_cast(twin, torch.bfloat16) is not first
    with torch.no_grad():
        w.mul_(2)
    second = frozen_cast(w, torch.bfloat16)
    assert second is not first and torch.equal(second, w.to(torch.bfloat16))
    w.data = torch.randn(8, 8)
    third = frozen_cast(w, torch.bfloat16)
    assert third is not second and torch.equal(third, w.to(torch.bfloat16))
    forget_frozen_casts([w])
    assert frozen_cast(w, torch.bfloat16) is not third
    w.requires_grad_(True)  # a trained weight is never served from the cache
    assert frozen_cast(w, torch.bfloat16) is not frozen_cast(w, torch.bfloat16)
    forget_frozen_casts([w], unregister=True)
    w.requires_grad_(False)
    assert frozen_cast(w, torch.bfloat16) is not frozen_cast(w, torch.bfloat16)


def test_torch_compile_runs_an_attached_model_as_eager_does():
    """Dynamo traces a converted, attached model (kept frozen casts are skipped while it
    traces) and trains it as eager mode does, loss for loss and bit for bit."""

    def run(compiled: bool):
        torch.manual_seed(0)
        model = tiny("bert", layers=1).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sf = slimfit.attach(model, opt, slimfit.SlimFitConfig(freeze_ratio=0.5))
        net = torch.compile(model, backend="eager") if compiled else model
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(2):
            ids = torch.randint(0, 100, (2, 16), generator=g)
            with torch.autocast("cpu", torch.bfloat16):
                loss = net(input_ids=ids, labels=torch.zeros(2, dtype=torch.long)).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        sf.detach()
        return losses, [p.detach().clone() for p in model.parameters()]

    torch._dynamo.reset()
    (eager_losses, eager_params), (losses, params) = run(False), run(True)
    torch._dynamo.reset()
    assert losses == eager_losses
    assert all(torch.equal(a, b) for a, b in zip(params, eager_params))
