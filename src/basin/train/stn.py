"""Self-Tuning Networks (MacKay, Vicol, Lorraine, Duvenaud, Grosse, ICLR 2019, arXiv:1903.03088):
hyperparameters tuned online through a structured best-response approximation."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from basin.optim._base import check_bool, check_int, check_range

__all__ = ["STN", "STNConv2d", "STNLinear"]

Loss = Callable[[Any, Tensor], Tensor]
OptimFactory = Callable[[list[Tensor]], Optimizer]


class _STNLayer(nn.Module):
    """Shared parameters: ``weight_elem``, ``weight_hyper`` (same shape), optional ``bias_elem``,
    ``bias_hyper``, and ``hnet`` (``V`` stacked over ``V'``: ``(2 out or out) x n_hparams``)."""

    out_features: int

    def _init_stn(
        self,
        shape: tuple[int, ...],
        fan_in: int,
        n_hparams: int,
        bias: bool,
        dtype: torch.dtype | None,
        device: torch.device | str | None,
    ) -> None:
        check_int("n_hparams", n_hparams, 1)
        check_bool("bias", bias)
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        out = shape[0]
        self.out_features, self.n_hparams = out, n_hparams
        bound = 1.0 / math.sqrt(fan_in)
        self.weight_elem = nn.Parameter(torch.empty(shape, **kw).uniform_(-bound, bound))
        self.weight_hyper = nn.Parameter(torch.empty(shape, **kw).uniform_(-bound, bound))
        if bias:
            self.bias_elem: nn.Parameter | None = nn.Parameter(
                torch.empty(out, **kw).uniform_(-bound, bound)
            )
            self.bias_hyper: nn.Parameter | None = nn.Parameter(
                torch.empty(out, **kw).uniform_(-bound, bound)
            )
        else:
            self.register_parameter("bias_elem", None)
            self.register_parameter("bias_hyper", None)
        rows = 2 * out if bias else out
        self.hnet = nn.Parameter(torch.empty(rows, n_hparams, **kw).normal_(0.0, 0.01))

    def scales(self, h: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(V h, V' h)``: shape ``(out,)`` for ``h`` of shape ``(n_hparams,)``, ``(B, out)`` for
        per-example hyperparameters ``(B, n_hparams)``."""
        if h.dim() not in (1, 2) or h.shape[-1] != self.n_hparams:
            raise ValueError(
                f"h must have shape ({self.n_hparams},) or (B, {self.n_hparams}), "
                f"got {tuple(h.shape)}"
            )
        s = h @ self.hnet.T
        out = self.out_features
        return s[..., :out], (s[..., out:] if self.bias_elem is not None else None)

    def weight(self, h: Tensor) -> Tensor:
        """``W(h) = W_elem + (V h) (row-wise) W_hyper`` (a leading batch axis for 2-D ``h``)."""
        sw, _ = self.scales(h)
        extra = (1,) * (self.weight_elem.dim() - 1)
        return self.weight_elem + sw.reshape(*sw.shape, *extra) * self.weight_hyper

    def bias(self, h: Tensor) -> Tensor | None:
        """``b(h) = b_elem + (V' h) * b_hyper`` (``None`` without bias)."""
        _, sb = self.scales(h)
        if sb is None or self.bias_elem is None or self.bias_hyper is None:
            return None
        return self.bias_elem + sb * self.bias_hyper

    def _combine(self, elem: Tensor, hyper: Tensor, h: Tensor, extra: int) -> Tensor:
        sw, sb = self.scales(h)
        tail = (1,) * extra
        out = elem + sw.reshape(*sw.shape, *tail) * hyper
        if sb is not None and self.bias_hyper is not None:
            out = out + (sb * self.bias_hyper).reshape(*sb.shape, *tail)
        return out


class STNLinear(_STNLayer):
    r"""A linear layer whose weights are the STN best-response approximation of its
    hyperparameters ``h`` (MacKay et al. 2019, Sec. 4.2)::

        y = x W_elem^T + b_elem + (V h) * (x W_hyper^T) + (V' h) * b_hyper

    i.e. ``W(h) = W_elem + (V h) row-scales W_hyper``, ``b(h) = b_elem + (V' h) * b_hyper``.
    ``forward(x, h)``: ``h`` of shape ``(n_hparams,)`` (one setting for the batch) or
    ``(B, n_hparams)`` (one per example, ``x`` of shape ``(B, in)``). Initialization as the
    authors' code: ``W_elem, W_hyper, b_elem, b_hyper ~ U(-1/sqrt(in), 1/sqrt(in))``,
    ``V ~ N(0, 0.01^2)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n_hparams: int,
        bias: bool = True,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_int("in_features", in_features, 1)
        check_int("out_features", out_features, 1)
        self.in_features = in_features
        self._init_stn((out_features, in_features), in_features, n_hparams, bias, dtype, device)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        elem = F.linear(x, self.weight_elem, self.bias_elem)
        return self._combine(elem, F.linear(x, self.weight_hyper), h, 0)


class STNConv2d(_STNLayer):
    r"""The convolutional STN layer: ``conv(x, W_elem) + b_elem + (V h) * conv(x, W_hyper) +
    (V' h) * b_hyper``, the scales broadcast over output channels (per example for ``h`` of
    shape ``(B, n_hparams)``). ``stride``, ``padding``, ``dilation``, ``groups`` as
    ``nn.Conv2d``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        n_hparams: int,
        *,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_int("in_channels", in_channels, 1)
        check_int("out_channels", out_channels, 1)
        check_int("groups", groups, 1)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups must divide in_channels and out_channels, got {groups}")
        k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        if len(k) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in k):
            raise ValueError(f"kernel_size must be an integer >= 1 or a pair, got {kernel_size!r}")
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        shape = (out_channels, in_channels // groups, k[0], k[1])
        fan_in = in_channels // groups * k[0] * k[1]
        self._init_stn(shape, fan_in, n_hparams, bias, dtype, device)

    def _conv(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        elem = self._conv(x, self.weight_elem, self.bias_elem)
        return self._combine(elem, self._conv(x, self.weight_hyper, None), h, 2)


def _inv_softplus(x: Tensor) -> Tensor:
    return x + torch.log(-torch.expm1(-x))


class STN:
    r"""The STN training loop (MacKay et al. 2019, Alg. 1): alternate ``train_steps`` steps of
    the weights ``phi`` (elementary, hyper and ``V`` weights of the STN layers, and any others)
    on the training loss at perturbed hyperparameters with ``val_steps`` steps of the
    hyperparameters on the validation loss through the best-response approximation::

        train step:  eps ~ N(0, diag(sigma^2)),  phi <- opt_w(phi, grad_phi f(batch, lam + eps))
        hyper step:  lam_v = lam + eps (perturb_val) or lam,
                     obj = F(batch, lam_v) - tau * H[N(0, diag(sigma^2))]   (tau term: learn_sigma)
                     lam <- opt_h(lam, grad_lam obj);  rho <- opt_s(rho, grad_rho obj)

    with ``sigma = softplus(rho)`` and ``H = sum_i log(sigma_i sqrt(2 pi e))``. ``lam``
    (:attr:`hparams`) are unconstrained hyperparameters (e.g. log weight decay, logit dropout);
    ``train_loss(batch, h)`` and ``val_loss(batch, h)`` compute the losses with the STN
    layers fed ``h`` (a regularizer such as ``exp(h[0]) / 2 * ||W(h)||^2`` goes in
    ``train_loss``; ``val_loss`` should be the plain validation loss). ``h`` has shape ``(H,)``,
    or ``(samples, H)`` with one perturbation per row when ``samples`` is set (per-example
    perturbations, as the authors' code). The hyper step differentiates only through ``h``.

    Arguments: ``weights`` (leaf tensors with ``requires_grad``), ``hparams`` (initial
    unconstrained values, 1-D), ``sigma`` (> 0, initial perturbation scale, scalar or one per
    hyperparameter, default 0.5), ``learn_sigma`` (default False), ``tau`` (entropy weight >= 0,
    default 1e-3), ``train_steps`` (T_train >= 1, default 2), ``val_steps`` (T_val >= 1, default
    1), ``samples`` (None or >= 1), ``perturb_val`` (default: ``learn_sigma``), optimizer
    factories ``weight_optimizer`` (default SGD lr 0.01, momentum 0.9), ``hyper_optimizer``
    and ``scale_optimizer`` (default Adam lr 3e-3), ``model`` (optional module put in train mode
    for train steps and eval mode for hyper steps), ``seed`` (perturbation generator).

    References: MacKay, Vicol, Lorraine, Duvenaud, Grosse, "Self-Tuning Networks: Bilevel
    Optimization of Hyperparameters using Structured Best-Response Functions", ICLR 2019,
    arXiv:1903.03088; code github.com/asteroidhouse/self-tuning-networks.
    """

    def __init__(
        self,
        weights: Iterable[Tensor],
        train_loss: Loss,
        val_loss: Loss,
        hparams: Tensor | Sequence[float],
        *,
        sigma: float | Sequence[float] | Tensor = 0.5,
        learn_sigma: bool = False,
        tau: float = 1e-3,
        train_steps: int = 2,
        val_steps: int = 1,
        samples: int | None = None,
        perturb_val: bool | None = None,
        weight_optimizer: OptimFactory | None = None,
        hyper_optimizer: OptimFactory | None = None,
        scale_optimizer: OptimFactory | None = None,
        model: nn.Module | None = None,
        seed: int | None = None,
    ) -> None:
        self.weights = list(weights)
        if not self.weights:
            raise ValueError("weights must be non-empty")
        for t in self.weights:
            if not (isinstance(t, Tensor) and t.is_leaf and t.requires_grad):
                raise ValueError("weights must be leaf tensors with requires_grad=True")
        if not callable(train_loss) or not callable(val_loss):
            raise ValueError("train_loss and val_loss must be callables (batch, h) -> loss")
        self.train_loss, self.val_loss = train_loss, val_loss
        ref = self.weights[0]
        kw: dict[str, Any] = {"dtype": ref.dtype, "device": ref.device}
        try:
            lam = torch.as_tensor(hparams, **kw).detach().clone()
            sig = torch.as_tensor(sigma, **kw).detach().clone()
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"hparams and sigma must be numbers or 1-D sequences ({e})") from None
        if lam.dim() != 1 or lam.numel() == 0 or not bool(torch.isfinite(lam).all()):
            raise ValueError(
                f"hparams must be a non-empty 1-D sequence of finite numbers, got {hparams!r}"
            )
        if sig.dim() == 0:
            sig = sig.expand(lam.shape).clone()
        if sig.shape != lam.shape or not bool((torch.isfinite(sig) & (sig > 0)).all()):
            raise ValueError(
                f"sigma must be > 0 and finite, a scalar or one per hyperparameter ({lam.numel()}), "
                f"got {sigma!r}"
            )
        check_bool("learn_sigma", learn_sigma)
        self.learn_sigma = learn_sigma
        self.tau = check_range("tau", tau, 0.0, math.inf, high_inclusive=False)
        self.train_steps = check_int("train_steps", train_steps, 1)
        self.val_steps = check_int("val_steps", val_steps, 1)
        if samples is not None:
            check_int("samples", samples, 1)
        self.samples = samples
        if perturb_val is not None:
            check_bool("perturb_val", perturb_val)
        self.perturb_val = learn_sigma if perturb_val is None else perturb_val
        if learn_sigma and not self.perturb_val:
            raise ValueError(
                "perturb_val must be True when learn_sigma=True (else only the entropy "
                "term moves sigma, which then grows without bound)"
            )
        for name, fac in (
            ("weight_optimizer", weight_optimizer),
            ("hyper_optimizer", hyper_optimizer),
            ("scale_optimizer", scale_optimizer),
        ):
            if fac is not None and not callable(fac):
                raise ValueError(f"{name} must be None or a callable params -> Optimizer")
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"model must be None or an nn.Module, got {type(model).__name__}")
        if seed is not None:
            check_int("seed", seed, 0)
        self.model = model
        self.hparams = lam.requires_grad_(True)
        self.raw_scale = _inv_softplus(sig).detach().requires_grad_(True)
        wf = weight_optimizer or (lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9))
        hf = hyper_optimizer or (lambda p: torch.optim.Adam(p, lr=3e-3))
        sf = scale_optimizer or (lambda p: torch.optim.Adam(p, lr=3e-3))
        self.weight_optimizer = wf(self.weights)
        self.hyper_optimizer = hf([self.hparams])
        self.scale_optimizer = sf([self.raw_scale])
        self.generator = torch.Generator(device=ref.device)
        s = int(torch.randint(0, 2**62, ())) if seed is None else seed
        self.generator.manual_seed(s)
        self.n_train, self.n_hyper = 0, 0

    @property
    def sigma(self) -> Tensor:
        """The perturbation scale ``softplus(rho)``."""
        return F.softplus(self.raw_scale)

    def entropy(self) -> Tensor:
        """Entropy of ``N(0, diag(sigma^2))``: ``sum_i log(sigma_i sqrt(2 pi e))``."""
        return torch.log(self.sigma * math.sqrt(2 * math.pi * math.e)).sum()

    def sample(self) -> Tensor:
        """``lam + sigma * eps``, shape ``(H,)`` or ``(samples, H)`` (differentiable)."""
        shape = self.hparams.shape if self.samples is None else (self.samples, self.hparams.numel())
        eps = torch.randn(
            shape, generator=self.generator, dtype=self.hparams.dtype, device=self.hparams.device
        )
        return self.hparams + self.sigma * eps

    def train_step(self, batch: Any) -> Tensor:
        """One step of the weights on ``train_loss(batch, lam + eps)``; returns the loss."""
        if self.model is not None:
            self.model.train()
        h = self.sample().detach()
        loss = self.train_loss(batch, h)
        grads = torch.autograd.grad(loss, self.weights, allow_unused=True)
        for p, g in zip(self.weights, grads, strict=True):
            p.grad = torch.zeros_like(p) if g is None else g
        self.weight_optimizer.step()
        self.n_train += 1
        return loss.detach()

    def hyper_step(self, batch: Any) -> Tensor:
        """One step of the hyperparameters (and of ``sigma`` when learned) on the validation
        loss through the best-response approximation; returns the validation loss."""
        was_training = self.model.training if self.model is not None else False
        if self.model is not None:
            self.model.eval()
        try:
            h = self.sample() if self.perturb_val else self.hparams
            loss = self.val_loss(batch, h)
            leaves = [self.hparams]
            obj = loss
            if self.learn_sigma:
                obj = loss - self.tau * self.entropy()
                leaves.append(self.raw_scale)
            grads = torch.autograd.grad(obj, leaves, allow_unused=True)
        finally:
            if self.model is not None:
                self.model.train(was_training)
        for p, g in zip(leaves, grads, strict=True):
            p.grad = torch.zeros_like(p) if g is None else g
        self.hyper_optimizer.step()
        if self.learn_sigma:
            self.scale_optimizer.step()
        self.n_hyper += 1
        return loss.detach()

    def step(self, train_batches: Iterable[Any], val_batches: Iterable[Any]) -> Tensor:
        """One cycle: ``train_steps`` train steps on batches drawn from ``train_batches``, then
        ``val_steps`` hyper steps on ``val_batches`` (iterators are consumed as needed; a list
        is iterated from its start); returns the last validation loss."""
        ti: Iterator[Any] = iter(train_batches)
        vi: Iterator[Any] = iter(val_batches)
        for _ in range(self.train_steps):
            self.train_step(next(ti))
        loss = torch.zeros(())
        for _ in range(self.val_steps):
            loss = self.hyper_step(next(vi))
        return loss

    def state_dict(self) -> dict[str, Any]:
        """Weights, hyperparameters, scale, the three optimizers, the generator and counters
        (copies: later steps do not change it)."""
        return {
            "weights": [p.detach().clone() for p in self.weights],
            "hparams": self.hparams.detach().clone(),
            "raw_scale": self.raw_scale.detach().clone(),
            "weight_optimizer": copy.deepcopy(self.weight_optimizer.state_dict()),
            "hyper_optimizer": copy.deepcopy(self.hyper_optimizer.state_dict()),
            "scale_optimizer": copy.deepcopy(self.scale_optimizer.state_dict()),
            "generator": self.generator.get_state(),
            "n_train": self.n_train,
            "n_hyper": self.n_hyper,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["weights"]) != len(self.weights):
            raise ValueError(
                f"state has {len(state['weights'])} weight tensors, this STN has {len(self.weights)}"
            )
        with torch.no_grad():
            for p, v in zip(self.weights, state["weights"], strict=True):
                p.copy_(v)
            self.hparams.copy_(state["hparams"])
            self.raw_scale.copy_(state["raw_scale"])
        self.weight_optimizer.load_state_dict(state["weight_optimizer"])
        self.hyper_optimizer.load_state_dict(state["hyper_optimizer"])
        self.scale_optimizer.load_state_dict(state["scale_optimizer"])
        self.generator.set_state(state["generator"])
        self.n_train, self.n_hyper = int(state["n_train"]), int(state["n_hyper"])
