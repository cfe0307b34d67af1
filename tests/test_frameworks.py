"""basin optimizers handed to HF Trainer, Accelerate and Lightning with basin's routing intact
(docs/frameworks.md). Tiny models built from configs, synthetic tokens, no hub downloads."""

from __future__ import annotations

import pytest
import torch

import basin.optim as bo

VOCAB, SEQ = 97, 16


def _gpt2(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def _roles(opt, model) -> dict[str, tuple[bool, bool]]:
    """Parameter name -> (matrix_rule, transposed) of its group."""
    where = {}
    for g in opt.param_groups:
        for p in g["params"]:
            where[id(p)] = (g["matrix_rule"], g.get("transposed", False))
    return {n: where[id(p)] for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["muon", "swan", "cosmos", "frugal"])
def test_create_routes_gpt2(name: str) -> None:
    model = _gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    opt = bo.create(name, model)
    roles = _roles(opt, model)
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(model.parameters()))  # the tied weight once
    for n, (rule, transposed) in roles.items():
        if n.endswith(("wte.weight", "wpe.weight")) or ".ln_" in n or n.endswith("bias"):
            assert rule is False, n
        else:  # c_attn, c_proj, c_fc: HF Conv1D, stored (in, out)
            assert n.endswith(".weight") and (rule, transposed) == (True, True), n
    assert sum(rule for rule, _ in roles.values()) == 2 * 4  # 4 Conv1D weights per block


def test_framework_parameter_lists_are_refused_with_what_to_do() -> None:
    model = _gpt2()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    with pytest.raises(ValueError) as info:
        bo.Muon(groups)  # what Trainer(optimizer_cls_and_kwargs=(Muon, {})) does
    msg = str(info.value)
    assert "optimizers=(basin.optim.create('muon', model), None)" in msg
    assert "Muon(model" in msg and "docs/frameworks.md" in msg


def _lm_dataset(n: int = 32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=gen)
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


def _trainer(model, opt, tmp_path, max_steps: int, **kw):
    transformers = pytest.importorskip("transformers")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
        report_to=[], save_steps=2, save_strategy="steps", logging_steps=1,
        lr_scheduler_type="linear", warmup_steps=1, use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True, **kw,
    )  # fmt: skip
    return transformers.Trainer(
        model=model, args=args, train_dataset=_lm_dataset(), optimizers=(opt, None)
    )


def test_trainer_with_a_basin_optimizer_scheduler_and_resume(tmp_path) -> None:
    pytest.importorskip("accelerate")
    model = _gpt2()
    opt = bo.create("muon", model, lr=0.02, adamw_lr=3e-3)
    base = [g["lr"] for g in opt.param_groups]
    trainer = _trainer(model, opt, tmp_path / "a", max_steps=4)
    out = trainer.train()
    assert out.global_step == 4
    assert trainer.optimizer.optimizer is opt or trainer.optimizer is opt  # Accelerate wraps it
    # the Trainer's linear schedule (1 warmup step, 4 steps) scaled every group's own lr
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.0 * b for b in base])
    assert trainer.lr_scheduler.base_lrs == pytest.approx(base)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    final = {n: p.detach().clone() for n, p in model.named_parameters()}

    # resume from step 2 with a fresh model and optimizer: the same weights at step 4
    model_b = _gpt2(seed=1)  # other init: the checkpoint must overwrite it
    opt_b = bo.create("muon", model_b, lr=0.02, adamw_lr=3e-3)
    trainer_b = _trainer(model_b, opt_b, tmp_path / "b", max_steps=4)
    trainer_b.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert trainer_b.state.global_step == 4
    for n, p in model_b.named_parameters():
        torch.testing.assert_close(p.detach(), final[n], rtol=0, atol=1e-6, msg=n)
    # the optimizer state came back too (Muon momentum of a Conv1D weight)
    w = model_b.transformer.h[0].attn.c_attn.weight
    assert "momentum_buffer" in opt_b.state[w]


def test_trainer_optimizer_cls_and_kwargs_with_the_model() -> None:
    """The Trainer's class-and-kwargs path: pass the model (Trainer hands it over as params)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = _gpt2()
    args = transformers.TrainingArguments(output_dir="unused", report_to=[], use_cpu=True)
    trainer = transformers.Trainer(
        model=model, args=args, optimizer_cls_and_kwargs=(bo.Muon, {"model": model, "lr": 0.01})
    )
    opt = trainer.create_optimizer()
    roles = _roles(opt, model)
    assert roles["transformer.wte.weight"] == (False, False)
    assert roles["transformer.h.0.mlp.c_fc.weight"] == (True, True)
    trainer_bad = transformers.Trainer(
        model=model, args=args, optimizer_cls_and_kwargs=(bo.Muon, {})
    )
    with pytest.raises(ValueError, match=r"optimizers=\(basin\.optim\.create\('muon', model\)"):
        trainer_bad.create_optimizer()


def test_accelerate_prepare_keeps_the_groups() -> None:
    accelerate = pytest.importorskip("accelerate")
    model = _gpt2()
    opt = bo.create("muon", model, lr=0.02)
    groups = [(g["matrix_rule"], g["transposed"], len(g["params"])) for g in opt.param_groups]
    acc = accelerate.Accelerator(cpu=True)
    model, popt = acc.prepare(model, opt)
    batch = torch.randint(0, VOCAB, (4, SEQ))
    loss = model(input_ids=batch, labels=batch).loss
    acc.backward(loss)
    popt.step()
    popt.zero_grad()
    assert [
        (g["matrix_rule"], g["transposed"], len(g["params"])) for g in popt.param_groups
    ] == groups
    assert len(opt.state) == len(list(model.parameters()))


def test_lightning_configure_optimizers(tmp_path) -> None:
    pl = pytest.importorskip("lightning.pytorch")

    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _gpt2()

        def training_step(self, batch, batch_idx):
            (x,) = batch
            return self.model(input_ids=x, labels=x).loss

        def configure_optimizers(self):
            opt = bo.create("muon", self, lr=0.02, adamw_lr=3e-3)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    import basin.landscape as bl

    data = torch.utils.data.TensorDataset(torch.randint(0, VOCAB, (16, SEQ)))
    lm = LM()
    module, loss_fn = bl.hf_adapter(lm.model)
    ids = data.tensors[0][:4]
    tracker = bl.SharpnessTracker(module, loss_fn, (ids, ids), every=3, tol=1e-3)
    trainer = pl.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
        callbacks=[bl.lightning_callback(tracker)],
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(lm, torch.utils.data.DataLoader(data, batch_size=4))
    (opt,) = trainer.optimizers
    roles = _roles(opt, lm)
    assert roles["model.transformer.wte.weight"] == (False, False)
    assert roles["model.transformer.h.1.attn.c_proj.weight"] == (True, True)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02 / 4)  # the scheduler ran 3 steps
    assert tracker.steps == [3] and tracker.sharpness[0] > 0  # the callback measured step 3


def test_conv1d_layer_trains_like_linear_in_gpt2() -> None:
    """End to end: one Muon step on GPT-2 moves c_fc by the nn.Linear-rule spectral norm."""
    model = _gpt2()
    opt = bo.create("muon", model, lr=1.0, ns_dtype=torch.float32)
    w = model.transformer.h[0].mlp.c_fc.weight  # (32, 128): in, out
    batch = torch.randint(0, VOCAB, (4, SEQ))
    model(input_ids=batch, labels=batch).loss.backward()
    before = w.detach().clone()
    opt.step()
    sigma = torch.linalg.matrix_norm(w.detach() - before, ord=2).item()
    assert 2.0 < sigma < 2.6  # sqrt(128 / 32) = 2 times NS5's ~[0.7, 1.2]; 1.13 before the fix


def test_sharpness_tracker_as_a_trainer_callback(tmp_path) -> None:
    pytest.importorskip("accelerate")
    import basin.landscape as bl

    model = _gpt2()
    module, loss_fn = bl.hf_adapter(model)
    ids = torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(3))
    tracker = bl.SharpnessTracker(module, loss_fn, (ids, ids), every=2, tol=1e-3)
    opt = bo.create("adabelief", model, lr=1e-3, rectify=False)
    trainer = _trainer(model, opt, tmp_path, max_steps=4)
    trainer.add_callback(bl.trainer_callback(tracker))
    trainer.train()
    assert tracker.steps == [2, 4]
    assert all(s > 0 for s in tracker.sharpness)
    logged = [e for e in trainer.state.log_history if "sharpness" in e]
    assert [e["step"] for e in logged] == [2, 4]
