"""basin.landscape.hf_adapter: tiny GPT-2 and BERT classifiers built from configs (no hub), in
float64, checked against dense Hessians / GGNs of a parameter subset computed here directly
from ``model(**inputs).logits`` (not through basin)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import basin.landscape as bl
from basin.landscape.hf import causal_lm_loss

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 13, 6


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=1, n_embd=8, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=SEQ, num_labels=3,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(cfg).double().eval()


def _lm_batch(n: int = 3):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # padding at the end of the first sequence
    labels = ids.clone()
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask}, labels


def _cls_batch(n: int = 4):
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.arange(n) % 3


def _dense(model, prefix: str, inputs, labels, loss: str):
    """Dense Hessian and GGN of the loss over the parameters under ``prefix``, from
    ``model(**inputs).logits`` and the loss written out here."""
    names = [n for n, _ in model.named_parameters() if n.startswith(prefix)]
    base = {n: p.detach() for n, p in model.named_parameters()}
    flat0 = torch.cat([base[n].reshape(-1) for n in names])
    sizes = [base[n].numel() for n in names]

    def logits(flat):
        parts = dict(zip(names, flat.split(sizes)))
        params = {**base, **{n: parts[n].view(base[n].shape) for n in names}}
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            return torch.func.functional_call(model, params, (), inputs).logits

    def loss_of(z):
        if loss == "classification":
            return F.cross_entropy(z, labels)
        keep = labels[:, 1:] != -100
        logp = z[:, :-1].log_softmax(-1)
        picked = logp.gather(-1, labels[:, 1:].clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return -(picked * keep).sum() / keep.sum()

    hess = torch.autograd.functional.hessian(lambda f: loss_of(logits(f)), flat0)
    z0 = logits(flat0).detach()
    jac = torch.autograd.functional.jacobian(logits, flat0).reshape(z0.numel(), -1)
    h_out = torch.autograd.functional.hessian(lambda z: loss_of(z.view_as(z0)), z0.reshape(-1))
    return hess, jac.T @ h_out @ jac


def _check_trace(module, loss_fn, batch, sel, kind, dense) -> None:
    """Hutch++ with the largest budget it takes (a sketch of rank n - 1): all but one direction
    exact, so within 1% of the spectrum's absolute sum."""
    n = dense.shape[0]
    tr = bl.hessian_trace(module, loss_fn, batch, params=sel, kind=kind, n_hvp=3 * n - 1)
    scale = np.abs(np.linalg.eigvalsh(dense)).sum()
    assert abs(tr.trace - np.trace(dense)) <= 1e-2 * scale, (tr.trace, np.trace(dense), scale)


def test_causal_lm_loss_is_the_models_own() -> None:
    model = _gpt2()
    inputs, labels = _lm_batch()
    module, loss_fn = bl.hf_adapter(model, loss="causal_lm")
    ours = loss_fn(module(inputs), labels)
    theirs = model(**inputs, labels=labels).loss  # transformers upcasts to float32
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-6, atol=0)
    # a tensor of input ids, labels inside the dict and a tuple output work the same
    torch.testing.assert_close(module(inputs["input_ids"]), model(inputs["input_ids"]).logits)
    torch.testing.assert_close(module({**inputs, "labels": labels}), module(inputs))
    with pytest.raises(ValueError, match="causal_lm loss needs logits"):
        causal_lm_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_gpt2_curvature_matches_dense(kind: str) -> None:
    model = _gpt2()
    inputs, labels = _lm_batch()
    prefix = "transformer.h.0.attn.c_attn"  # HF Conv1D, through attention (8*24 + 24 = 216)
    hess, ggn = _dense(model, prefix, inputs, labels, "causal_lm")
    dense = (hess if kind == "hessian" else ggn).numpy()
    want = np.linalg.eigvalsh(dense)[::-1]
    module, loss_fn = bl.hf_adapter(model)
    sel = "model." + prefix
    eig = bl.hessian_eigenvalues(module, loss_fn, (inputs, labels), k=2, params=sel, kind=kind)
    np.testing.assert_allclose(eig.eigenvalues, want[:2], rtol=1e-6)
    _check_trace(module, loss_fn, (inputs, labels), sel, kind, dense)


def test_classifier_curvature_matches_dense() -> None:
    model = _bert()
    inputs, labels = _cls_batch()
    prefix = "bert.pooler"  # 8*8 + 8 = 72, plus the classifier head below
    hess, ggn = _dense(model, prefix, inputs, labels, "classification")
    module, loss_fn = bl.hf_adapter(model, loss="classification")
    sel = "model." + prefix
    for kind, dense in (("hessian", hess.numpy()), ("ggn", ggn.numpy())):
        want = np.linalg.eigvalsh(dense)[::-1]
        eig = bl.hessian_eigenvalues(module, loss_fn, (inputs, labels), k=1, params=sel, kind=kind)
        np.testing.assert_allclose(eig.eigenvalues, want[:1], rtol=1e-6)
        _check_trace(module, loss_fn, (inputs, labels), sel, kind, dense)


def test_whole_model_and_compiled_module() -> None:
    """All parameters (tied embedding/head once) of the tiny GPT-2; a torch.compile'd model is
    unwrapped to the same module (the products never run compiled)."""
    model = _gpt2()
    batch = _lm_batch()
    module, loss_fn = bl.hf_adapter(model)
    eig = bl.hessian_eigenvalues(module, loss_fn, batch, k=1, tol=1e-4)
    ggn = bl.hessian_trace(module, loss_fn, batch, kind="ggn", n_hvp=30)
    assert eig.eigenvalues[0] > 0 and ggn.trace > 0
    n_params = sum(p.numel() for p in model.parameters())
    assert eig.eigenvectors.shape == (1, n_params)
    compiled, loss_c = bl.hf_adapter(torch.compile(model))
    assert compiled.model is model
    again = bl.hessian_eigenvalues(compiled, loss_c, batch, k=1, tol=1e-4)
    np.testing.assert_array_equal(again.eigenvalues, eig.eigenvalues)


def test_model_left_as_it_was_and_errors() -> None:
    model = _gpt2().train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    module, loss_fn = bl.hf_adapter(model)
    bl.hessian_trace(module, loss_fn, _lm_batch(), params="model.transformer.ln_f", n_hvp=6)
    assert model.training
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    with pytest.raises(ValueError, match="loss must be one of"):
        bl.hf_adapter(model, loss="mlm")
