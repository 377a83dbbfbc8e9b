"""Spectral normalization as a parametrization: ``W -> W / sigma(W)``.

sigma is either the reshaped-kernel norm of SN-GAN (Miyato et al. 2018) or the layer's true
operator norm (power iteration on the conv operator itself); the power-iteration vectors ``u``
and ``v`` are buffers (in the state_dict).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from lipgan.errors import LipganError
from lipgan.layers.weights import _CONV_T, WEIGHT_LAYERS, _unit, reshaped_weight


class SpectralNormParametrization(nn.Module):
    """``W -> W / sigma`` with ``sigma = <u, A_W v>`` from a kept power iteration.

    ``mode="reshaped"`` (SN-GAN): ``A_W`` is the reshaped kernel ``W_mat`` (``c_out x c_in k k``),
    ``u`` of shape ``(c_out,)``, ``v`` of shape ``(c_in k k,)``. ``mode="operator"``: ``A_W`` is
    the linear map the layer applies (the convolution with its stride, padding, dilation and
    groups), ``v`` an input-shaped and ``u`` an output-shaped tensor; its norm is the layer's
    Lipschitz constant, which for convolutions differs from ``sigma(W_mat)``. For Linear layers
    both modes are the same.

    The input shape of a convolution is learned by a forward pre-hook on the layer at its first
    forward call (15 power iterations then); the normalized weight cannot be read before that.
    If a later input has another spatial shape, ``u`` and ``v`` are re-initialized for it.

    Updates: in training mode the estimate advances ``n_power_iterations`` steps once per
    training step, on the first forward after the step was marked stale, either by
    :meth:`mark_stale` (``SpectralNorm.after_step`` calls it) or by an in-place change of the
    weight (an optimizer step, detected by the tensor's version counter; fused optimizers do not
    bump it, so trainers call ``after_step``). ``D(real)``, ``D(fake)`` and ``D(interpolates)`` in
    one step therefore share one update. In eval mode ``u`` and ``v`` are used as they are.
    The gradient flows through ``sigma = <u, A_W v>`` with ``u``, ``v`` held constant, as in
    SN-GAN.

    Certification: ``converge(weight, certify=True)`` (what :func:`converge_spectral_norms` and
    ``SpectralNorm.converge`` run) replaces the power estimate by a certified *upper* bound
    ``B >= ||A_W||_2`` of what the mode promises (the operator norm in operator mode,
    ``sigma(W_mat)`` in reshaped mode), so the layer divides by ``B`` and is at most 1 by
    construction, not up to the iteration's convergence: ``B`` is exact (float64 eigenvalues of
    the smaller Gram matrix of the layer's dense map, built from torch's own forward) where the
    map has at most ``DENSE_LIMIT`` entries on its smaller side, else
    ``lipgan.norms.conv_operator_norm(..., "auto")``, lipgan.analysis's certified per-layer
    bound (the exact FFT norm for a circular conv whose output is input / stride, Sedghi et al.
    2019; a dense or block-sparse Cholesky certificate of the Gram matrix, 5e-4 / ~2e-3 above the
    norm, for a zero-padded conv where affordable; else the frequency bound, docs/analysis.md).
    The kept vectors restart from the top singular vector (dense) or from a fresh Lanczos start,
    so a vector stuck on the wrong spatial frequency (a circular conv never mixes frequencies)
    is replaced. ``B / <u, A_W v>`` is kept in the buffer
    ``_certificate`` (saved with the state_dict) until the next training-mode power step, which
    resets it to 1: one power step per training step costs what it did.
    """

    def __init__(
        self,
        layer: nn.Module,
        mode: str = "reshaped",
        n_power_iterations: int = 1,
        init_iterations: int = 15,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        if mode not in ("reshaped", "operator"):
            raise LipganError(f"spectral norm mode must be 'reshaped' or 'operator', not {mode!r}")
        if n_power_iterations < 1:
            raise LipganError("n_power_iterations must be at least 1")
        if not isinstance(layer, WEIGHT_LAYERS):
            raise LipganError(
                f"spectral norm applies to Linear/Conv/ConvTranspose layers, not {type(layer)}"
            )
        self.mode = mode
        self.n_power_iterations = n_power_iterations
        self.init_iterations = init_iterations
        self.eps = eps
        self._transposed = isinstance(layer, _CONV_T)
        # operator mode only matters for convolutions: a Linear's operator norm is sigma(W)
        self._conv_operator = mode == "operator" and not isinstance(layer, nn.Linear)
        if self._conv_operator and not isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            raise LipganError(
                "operator-mode spectral norm supports Linear, Conv2d and ConvTranspose2d; use "
                f"mode='reshaped' for {type(layer).__name__}"
            )
        self._stale = True
        self._seen_version = -1
        #: (C, H, W) of the conv input in operator mode, learned at the first forward
        self.input_shape: tuple[int, ...] | None = None
        weight = layer.weight.detach()
        if self._conv_operator:
            self._geometry = _conv_geometry(layer)
            # shapes unknown until the first forward (see the pre-hook); empty until then
            self.register_buffer("_u", weight.new_empty(0))
            self.register_buffer("_v", weight.new_empty(0))
            layer.register_forward_pre_hook(self._learn_input_shape)
            self._register_load_state_dict_pre_hook(self._resize_on_load)
        else:
            w = reshaped_weight(weight, layer).float()
            gen_u = torch.randn(w.shape[0], device=w.device)
            self.register_buffer("_u", _unit(gen_u, eps))
            self.register_buffer("_v", _unit(w.t() @ self._u, eps))
            with torch.no_grad():
                self._power(weight, init_iterations)
        # B / <u, A v> after a certifying converge(); 1 once training moves the weight again
        self.register_buffer("_certificate", torch.ones((), device=weight.device))
        self._register_load_state_dict_pre_hook(self._certificate_on_load)

    # -- state ------------------------------------------------------------------------------
    def mark_stale(self) -> None:
        """Let the next training-mode forward advance the power iteration."""
        self._stale = True

    def resume_state(self) -> dict:
        """What a checkpoint needs beyond ``state_dict()`` to resume bit-exactly: whether the
        next training-mode forward iterates (a fresh parametrization always does)."""
        return {"stale": bool(self._stale)}

    def load_resume_state(self, state: dict, weight: torch.Tensor) -> None:
        """Restore :meth:`resume_state`; ``weight`` is the just-loaded original weight, whose
        current version counts as seen (loading it is not a training change)."""
        self._stale = bool(state.get("stale", True))
        self._seen_version = weight._version

    def _learn_input_shape(self, layer: nn.Module, args: tuple) -> None:
        shape = tuple(args[0].shape[-3:])
        if shape != self.input_shape:
            self.input_shape = shape
            weight = _original_weight(layer).detach().float()
            with torch.no_grad():
                self._certificate.fill_(1.0)
                self._v = _unit(torch.randn((1, *shape), device=weight.device), self.eps)
                self._u = _unit(self._apply_op(self._v, weight), self.eps)
                self._power(weight, self.init_iterations)
                # The top singular values of a conv operator cluster (many frequencies close
                # to the largest), so 15 steps leave sigma a few percent low; converge once here.
                self.converge(weight)
            self._stale = True

    @torch.no_grad()
    def converge(
        self,
        weight: torch.Tensor,
        max_iterations: int = 500,
        tol: float = 1e-6,
        certify: bool = False,
    ) -> float:
        """Iterate until sigma changes by less than ``tol`` (relative) over 10 steps.

        Run at the first forward in operator mode; call it before certifying a trained network
        (``SpectralNorm.converge``). ``weight``: the layer's unnormalized weight. With
        ``certify`` the layer then divides by a certified upper bound of its norm (see the class
        docstring). Returns the sigma the layer now divides by.
        """
        self._certificate.fill_(1.0)
        dense = self._dense(weight) if certify else None
        if dense is None:
            last = float(self.sigma(weight))
            sig = last
            for _ in range(0, max_iterations, 10):
                self._power(weight, 10)
                sig = float(self.sigma(weight))
                if abs(sig - last) <= tol * abs(sig):
                    break
                last = sig
        if not certify:
            return sig
        bound = self._certified_bound(weight, dense)
        sig = float(self.sigma(weight))
        # sig is a Rayleigh quotient of the true map, a lower bound: the max stays an upper bound
        # (and guards against a bound that is not one)
        self._certificate.fill_(max(bound, sig) / max(sig, self.eps))
        # a training-mode forward before the next optimizer step keeps the certificate
        self._stale = False
        self._seen_version = weight._version
        return float(self.sigma(weight))

    # -- certification ----------------------------------------------------------------------
    #: the certificate uses the dense map when its smaller side has at most this many entries
    DENSE_LIMIT = 2048
    #: ... and the whole matrix at most this many (float64: 8 bytes each)
    DENSE_ENTRIES = 2**24
    #: relative margin over the float64 eigenvalue of the Gram matrix (its rounding ~1e-13)
    _MARGIN = 1e-9

    def _dense(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The dense matrix (inputs x outputs, float64) of the normalized map, or None if big.

        Operator mode on a conv: the layer's linear map (no bias) from torch's own conv on the
        identity basis, so every padding mode, stride and output_padding is exactly what the
        layer computes. Otherwise the (reshaped) weight matrix, transposed.
        """
        w = weight.detach().double()
        if not self._conv_operator:
            m = self._matrix(w)
            if min(m.shape) > self.DENSE_LIMIT or m.numel() > self.DENSE_ENTRIES:
                return None
            return m.t()
        n_in = math.prod(self.input_shape)
        shell = self._shell(w)
        zero = torch.zeros(1, *self.input_shape, dtype=w.dtype, device=w.device)
        n_out = math.prod(shell(zero).shape)
        if min(n_in, n_out) > self.DENSE_LIMIT or n_in * n_out > self.DENSE_ENTRIES:
            return None
        basis = torch.eye(n_in, dtype=w.dtype, device=w.device).reshape(n_in, *self.input_shape)
        return shell(basis).reshape(n_in, n_out)

    def _shell(self, weight: torch.Tensor) -> nn.Module:
        """A plain Conv2d / ConvTranspose2d with this layer's geometry and ``weight``, no bias."""
        g = self._geometry
        cls = nn.ConvTranspose2d if g["transposed"] else nn.Conv2d
        kwargs = dict(
            stride=g["stride"],
            padding=g["padding_arg"],
            dilation=g["dilation"],
            groups=g["groups"],
            bias=False,
            padding_mode=g["padding_mode"],
            device="meta",
        )
        if g["transposed"]:
            kwargs["output_padding"] = g["output_padding"]
        shell = cls(g["in_channels"], g["out_channels"], g["kernel_size"], **kwargs)
        shell.weight = nn.Parameter(weight.detach(), requires_grad=False)
        return shell

    def _certified_bound(self, weight: torch.Tensor, dense: torch.Tensor | None) -> float:
        """An upper bound of the norm the mode promises; also restarts the kept u, v from it."""
        w = weight.detach().float()
        if dense is not None:
            # exact: the top eigenpair of the smaller Gram matrix, in float64
            rows = dense.shape[0] <= dense.shape[1]
            gram = dense @ dense.t() if rows else dense.t() @ dense
            evals, evecs = torch.linalg.eigh(gram)
            top = evecs[:, -1]
            if rows:  # eigenvector on the input side: v
                v = top
            else:  # on the output side: v = A^T u
                v = dense @ top
            self._set_v(v.float(), w)
            return math.sqrt(max(float(evals[-1]), 0.0)) * (1 + self._MARGIN)
        if not self._conv_operator:
            m = self._matrix(weight.detach().double())
            u, s, vh = torch.linalg.svd(m, full_matrices=False)
            self._set_v(vh[0].float(), w)
            return float(s[0]) * (1 + self._MARGIN)
        from lipgan import norms

        shell = self._shell(weight.detach().float())
        # a fresh start (Lanczos from a random vector): the kept v may sit on a spatial frequency
        # the circular conv never leaves, or near a non-top singular vector
        sig, v = norms.conv_operator_norm(shell, self.input_shape, "power", return_vector=True)
        if sig > float(self.sigma(weight)):
            self._set_v(v.reshape(self._v.shape).float(), w)
        # the dense map is too large here: no dense fallback inside conv_operator_norm either
        return float(norms.conv_operator_norm(shell, self.input_shape, "auto", dense_limit=0))

    def _set_v(self, v: torch.Tensor, weight: torch.Tensor) -> None:
        """Kept v <- v / |v| and u <- A v / |A v|, so that sigma = <u, A v> = |A v| >= 0."""
        v = _unit(v.reshape(self._v.shape), self.eps)
        self._v.copy_(v)
        if self._conv_operator:
            self._u.copy_(_unit(self._apply_op(v, weight), self.eps))
        else:
            self._u.copy_(_unit(self._matrix(weight) @ v, self.eps))

    def _certificate_on_load(self, state_dict, prefix, *args, **kwargs) -> None:
        if prefix + "_certificate" not in state_dict:
            # saved before certificates existed: the kept power estimate, as it was then
            state_dict[prefix + "_certificate"] = torch.ones(())

    def _resize_on_load(self, state_dict, prefix, *args, **kwargs) -> None:
        # Lazily shaped buffers: take the saved shape so a fresh layer loads a trained one.
        for name in ("_u", "_v"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        saved_v = state_dict.get(prefix + "_v")
        if saved_v is not None and saved_v.numel() > 0:
            self.input_shape = tuple(saved_v.shape[1:])

    # -- maths ------------------------------------------------------------------------------
    def _operator(self, weight: torch.Tensor, v: torch.Tensor, n_iter: int):
        """lipgan.norms' power iteration on the conv operator: (||A_W v'||, v') after n_iter."""
        from lipgan import norms

        g = self._geometry
        return norms.conv_power_iteration(
            weight,
            self.input_shape,
            stride=g["stride"],
            padding=g["padding"],
            dilation=g["dilation"],
            groups=g["groups"],
            transposed=g["transposed"],
            u=v,
            n_iter=n_iter,
            output_padding=g["output_padding"],
            padding_mode=g["padding_mode"],
            eps=self.eps,
        )

    def _apply_op(self, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        from lipgan import norms

        return norms._apply_conv(v, weight, self._spec())

    def _spec(self) -> dict:
        g = self._geometry
        spec = {k: g[k] for k in ("stride", "dilation", "groups", "transposed", "padding_mode")}
        if g["transposed"]:
            spec.update(padding=g["padding"], output_padding=g["output_padding"])
        else:
            spec["pads"] = g["padding"]
        return spec

    def _matrix(self, weight: torch.Tensor) -> torch.Tensor:
        if self._transposed:
            weight = weight.transpose(0, 1)
        return weight.reshape(weight.shape[0], -1)

    @torch.no_grad()
    def _power(self, weight: torch.Tensor, iterations: int) -> None:
        """``iterations`` steps of v <- A^T u / |A^T u|, u <- A v / |A v| on the kept u, v."""
        w = weight.detach().float()
        u, v = self._u.float(), self._v.float()
        if self._conv_operator:
            if iterations > 0:
                _, v = self._operator(w, v, iterations)
            u = _unit(self._apply_op(v, w), self.eps)
        else:
            m = self._matrix(w)
            for _ in range(iterations):
                v = _unit(m.t() @ u, self.eps)
                u = _unit(m @ v, self.eps)
        self._u.copy_(u)
        self._v.copy_(v)

    def sigma(self, weight: torch.Tensor) -> torch.Tensor:
        """``<u, A_W v>`` in float32, differentiable in ``weight`` (u, v constant)."""
        u, v = self._u.float(), self._v.float()
        if torch.is_grad_enabled():
            # the buffers are updated in place at the next step, possibly before this backward
            u, v = u.clone(), v.clone()
        w = weight.float()
        cert = self._certificate.float()
        if self._conv_operator:
            # = <u, A_W v> with u = A v / |A v| kept; differentiable in the weight
            return self._operator(w, v, 0)[0] * cert
        return torch.dot(u, self._matrix(w) @ v) * cert

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self._conv_operator and self.input_shape is None:
            raise LipganError(
                "operator-mode spectral norm learns a conv layer's input shape at its first "
                "forward call: run one forward pass before reading the weight"
            )
        # autocast would run the matvecs in bf16; sigma must be float32
        with torch.autocast(device_type=weight.device.type, enabled=False):
            if self.training:
                version = -2 if torch.compiler.is_compiling() else weight._version
                if self._stale or (version >= 0 and version != self._seen_version):
                    # the weight moved: the certificate of the last converge() no longer holds
                    self._certificate.fill_(1.0)
                    self._power(weight, self.n_power_iterations)
                    self._stale = False
                    self._seen_version = version
            sigma = self.sigma(weight).clamp_min(self.eps)
        return weight / sigma.to(weight.dtype)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, n_power_iterations={self.n_power_iterations}"


def _original_weight(layer: nn.Module) -> torch.Tensor:
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight.original
    return layer.weight


def _conv_geometry(layer: nn.Module) -> dict:
    transposed = isinstance(layer, _CONV_T)
    if transposed:
        padding = tuple(layer.padding)
    else:
        # (top, bottom, left, right), also right for padding="same" with even kernels
        lw, rw, th, bh = (int(p) for p in layer._reversed_padding_repeated_twice)
        padding = (th, bh, lw, rw)
    return {
        "in_channels": layer.in_channels,
        "out_channels": layer.out_channels,
        "kernel_size": tuple(layer.kernel_size),
        "padding_arg": layer.padding,  # as given: "same" or numbers
        "transposed": transposed,
        "stride": tuple(layer.stride),
        "padding": padding,
        "dilation": tuple(layer.dilation),
        "groups": layer.groups,
        "output_padding": tuple(getattr(layer, "output_padding", (0, 0))),
        "padding_mode": layer.padding_mode,
    }


def spectral_norm(
    layer: nn.Module,
    mode: str = "reshaped",
    n_power_iterations: int = 1,
    init_iterations: int = 15,
    eps: float = 1e-12,
) -> nn.Module:
    """Register ``W -> W / sigma`` on ``layer.weight`` (see :class:`SpectralNormParametrization`).

    Example::

        conv = spectral_norm(nn.Conv2d(1, 64, 5, 2, 2), mode="operator")
        conv(torch.randn(8, 1, 28, 28))   # learns the input shape (1, 28, 28)
    """
    if parametrize.is_parametrized(layer, "weight"):
        for p in layer.parametrizations.weight:
            if isinstance(p, SpectralNormParametrization):
                return layer  # already normalized: attaching twice would divide twice
    param = SpectralNormParametrization(layer, mode, n_power_iterations, init_iterations, eps)
    # unsafe: in operator mode the parametrization cannot run before the input shape is known
    parametrize.register_parametrization(layer, "weight", param, unsafe=True)
    return layer


def converge_spectral_norms(
    module: nn.Module, max_iterations: int = 500, tol: float = 1e-6, certify: bool = True
) -> None:
    """:meth:`SpectralNormParametrization.converge` on every normalized layer of ``module``.

    With ``certify`` (the default) each layer then divides by a certified upper bound of its
    norm, so every operator-mode layer is at most 1-Lipschitz until the next training step.
    Operator-mode layers that have not seen an input yet are skipped (their shape is unknown).
    """
    for layer in module.modules():
        if not parametrize.is_parametrized(layer, "weight"):
            continue
        for p in layer.parametrizations.weight:
            if isinstance(p, SpectralNormParametrization) and not (
                p._conv_operator and p.input_shape is None
            ):
                p.converge(layer.parametrizations.weight.original, max_iterations, tol, certify)


def spectral_norm_parametrizations(module: nn.Module) -> list[SpectralNormParametrization]:
    """The spectral-norm parametrizations inside ``module``."""
    return [m for m in module.modules() if isinstance(m, SpectralNormParametrization)]
