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


def test_trainer_optimizer_cls_and_kwargs_with_the_model(tmp_path) -> None:
    """The Trainer's class-and-kwargs path: pass the model (Trainer hands it over as params)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = _gpt2()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
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


def test_ndim_routing_of_a_parameter_list_warns_with_the_fix() -> None:
    """adamw_fallback=True on a framework's list: vectors go to AdamW but the embeddings stay
    on the matrix rule (the list cannot tell); the optimizer says so, once."""
    model = _gpt2()
    groups = [{"params": [p for p in model.parameters()]}]
    with pytest.warns(
        UserWarning, match=r"embeddings and the output head .*create\('muon', model"
    ):
        opt = bo.Muon(groups, adamw_fallback=True)
    roles = _roles(opt, model)
    assert roles["transformer.wte.weight"] == (True, False)  # what the warning is about
    assert roles["transformer.h.0.ln_1.weight"] == (False, False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bo.create("muon", model)  # from the model: no warning
        bo.Muon([torch.nn.Parameter(torch.randn(4, 4))], adamw_fallback=True)  # only matrices


def test_create_passes_group_builder_options() -> None:
    model = _gpt2()
    opt = bo.create(
        "muon", model, groups={"head": None, "transposed": {"transformer.h.0.mlp.c_fc": False}}
    )
    roles = _roles(opt, model)
    assert roles["transformer.h.0.mlp.c_fc.weight"] == (True, False)  # override
    assert roles["transformer.h.1.mlp.c_fc.weight"] == (True, True)  # detected
    opt = bo.create("adabelief", model, groups={"weight_decay": 0.1, "lr": 1e-3})
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all(g["lr"] == 1e-3 for g in opt.param_groups)
    with pytest.raises(ValueError, match="groups= options need a model"):
        bo.create("muon", model.parameters(), groups={"head": None})
    with pytest.raises(ValueError, match="bad groups= option"):
        bo.create("muon", model, groups={"heads": None})


def test_accelerate_checkpoint_resume_continues_identically(tmp_path) -> None:
    """accelerator.save_state after 2 steps, load_state into a fresh model, optimizer and
    scheduler: steps 3-4 give the same weights as the uninterrupted run."""
    accelerate = pytest.importorskip("accelerate")
    batches = [torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(i))
               for i in range(4)]  # fmt: skip

    def setup(seed: int):
        acc = accelerate.Accelerator(cpu=True)
        model = _gpt2(seed)
        opt = bo.create("muon", model, lr=0.02, adamw_lr=3e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
        model, opt, sched = acc.prepare(model, opt, sched)
        return acc, model, opt, sched

    def train(acc, model, opt, sched, xs):
        for x in xs:
            acc.backward(model(input_ids=x, labels=x).loss)
            opt.step()
            sched.step()
            opt.zero_grad()

    acc, model, opt, sched = setup(0)
    train(acc, model, opt, sched, batches[:2])
    acc.save_state(str(tmp_path / "ckpt"))
    train(acc, model, opt, sched, batches[2:])
    acc_b, model_b, opt_b, sched_b = setup(1)  # other init: the checkpoint overwrites it
    acc_b.load_state(str(tmp_path / "ckpt"))
    train(acc_b, model_b, opt_b, sched_b, batches[2:])
    for (n, p), q in zip(model.named_parameters(), model_b.parameters()):
        assert torch.equal(p, q), n
    assert opt_b.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


def test_lightning_checkpoint_resume_continues_identically(tmp_path) -> None:
    """A Lightning checkpoint at the end of epoch 1, resumed with ckpt_path into a fresh
    module: the same weights after epoch 2 as the uninterrupted fit (basin optimizer and a
    per-step scheduler in configure_optimizers)."""
    pl = pytest.importorskip("lightning.pytorch")

    class LM(pl.LightningModule):
        def __init__(self, seed: int) -> None:
            super().__init__()
            self.model = _gpt2(seed)

        def training_step(self, batch, batch_idx):
            (x,) = batch
            return self.model(input_ids=x, labels=x).loss

        def configure_optimizers(self):
            opt = bo.create("adabelief", self, lr=1e-3, rectify=False)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    data = torch.utils.data.TensorDataset(
        torch.randint(0, VOCAB, (8, SEQ), generator=torch.Generator().manual_seed(0))
    )

    def fit(lm, epochs, root, ckpt=None, save=False):
        cb = [pl.callbacks.ModelCheckpoint(dirpath=str(root), save_top_k=-1)] if save else []
        trainer = pl.Trainer(
            max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=save,
            callbacks=cb, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=str(root),
        )  # fmt: skip
        loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)
        trainer.fit(lm, loader, ckpt_path=ckpt)
        return trainer

    full = LM(0)
    fit(full, 2, tmp_path / "full")
    first = LM(0)
    fit(first, 1, tmp_path / "a", save=True)
    (ckpt,) = (tmp_path / "a").glob("*.ckpt")
    resumed = LM(1)
    trainer = fit(resumed, 2, tmp_path / "b", ckpt=str(ckpt))
    assert trainer.global_step == 4
    for (n, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n
    (opt,) = trainer.optimizers
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 / 5)  # 4 scheduler steps
