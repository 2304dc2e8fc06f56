"""Cross-device BatchNorm (MegDet's CGBN): BatchNorm statistics over every image of a device group.

``torch.nn.SyncBatchNorm`` refuses CPU tensors as soon as a process group exists, so it cannot be used
with gloo; this layer is written on plain all-reduce calls and therefore runs on gloo (CPU) and NCCL
(CUDA) alike (:func:`megdet.layers.collectives.all_reduce`: ``torch.distributed.all_reduce``, or shared
memory between the CPU processes of one machine, where gloo's loopback latency would dominate). Per
layer it issues exactly one fused all-reduce in the forward pass (per-channel sum, sum of squares and
the element count, packed in one tensor) and one in the backward pass (per-channel sums of ``dy`` and
``dy * x_hat``). Statistics are weighted by element counts, so unequal per-device batches give exactly
the statistics of BatchNorm on the concatenated batch, and a device with an empty batch still takes
part in both collectives.

DDP and other collectives: the backward all-reduce runs inside the autograd Function's backward, i.e.
whenever the autograd engine reaches the layer. Every rank of a group must therefore run the same
cross-device BN layers, in the same order, in both passes (the same model, every layer's output used
in the loss, no rank skipping a branch), exactly like DDP's own requirement for its gradient buckets.
With ``group_size`` smaller than the world, groups hold different running statistics; DDP's
``broadcast_buffers=True`` would overwrite them with rank 0's at every forward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import FunctionCtx, once_differentiable

from megdet.layers import collectives

__all__ = ["CrossDeviceBatchNorm2d", "convert_cross_device_bn"]

# (world size, group size) -> (the default process group the subgroups were made from, this rank's
# subgroup). The default group is kept so that a destroyed and re-initialised world builds new groups.
_SUBGROUP_CACHE: dict[tuple[int, int], tuple[object, dist.ProcessGroup]] = {}


def _check_group_size(group_size: int | None) -> None:
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size < 1):
        raise ValueError(f"CrossDeviceBatchNorm2d: group_size must be a positive int or None, got {group_size!r}")


def _statistics_group(group_size: int | None) -> dist.ProcessGroup | None:
    """The process group whose devices share statistics, or None when there is nothing to share."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    size = world if group_size is None else group_size
    if world % size != 0:
        raise ValueError(
            f"CrossDeviceBatchNorm2d: world size {world} is not divisible by group_size {size}; "
            f"choose a group_size that divides {world}"
        )
    if size == 1:
        return None
    if size == world:
        return dist.group.WORLD
    world_group = dist.group.WORLD
    cached = _SUBGROUP_CACHE.get((world, size))
    if cached is not None and cached[0] is world_group:
        return cached[1]
    # new_subgroups makes groups of `size` consecutive ranks; every rank creates every group in the same
    # order (a collective over the world), which holds because all ranks reach the first BN layer.
    group, _ = dist.new_subgroups(group_size=size)
    _SUBGROUP_CACHE[(world, size)] = (world_group, group)
    return group


def _opt(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _var_mean(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel biased variance and mean of an (N, C, H, W) tensor with torch.var_mean (any device)."""
    return torch.var_mean(x, dim=(0, 2, 3), correction=0)


def _local_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel biased variance and mean of an (N, C, H, W) tensor (N * H * W > 0)."""
    if x.device.type == "cpu":
        # ATen's own BatchNorm statistics kernel (Welford, like var_mean): on CPU torch.var_mean over
        # dims (0, 2, 3) is several times slower and dominated the layer's time (BENCHMARKS.md).
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        return var, mean
    # Elsewhere (CUDA) var_mean; the 2-rank CPU test runs the layer through this function as well.
    return _var_mean(x)


class _CrossDeviceBatchNormFunction(torch.autograd.Function):
    """Training-mode BatchNorm whose statistics and input-gradient sums are all-reduced over `group`."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        eps: float,
        update_factor: float,
        group: dist.ProcessGroup,
    ) -> torch.Tensor:
        channels = x.shape[1]
        local_count = x.numel() // channels if channels else 0
        acc = _accumulation_dtype(x.dtype)
        xa = x.to(acc)
        # Robust variance: each rank takes its own mean and centred variance with torch.var_mean and sends
        # them as a sum and a sum of squares (n * (var + mean^2)) in float64. In the group's
        # E[x^2] - E[x]^2 the large mean^2 terms then cancel in float64 (and exactly for one rank), leaving
        # the centred variances plus the spread of the per-rank means -- no float32 cancellation.
        packed = torch.zeros(2 * channels + 1, dtype=torch.float64, device=x.device)
        if local_count > 0:
            var_l, mean_l = _local_moments(xa)
            mean64 = mean_l.double()
            packed[:channels] = mean64 * local_count
            packed[channels: 2 * channels] = (var_l.double() + mean64 * mean64) * local_count
        packed[2 * channels] = local_count
        collectives.all_reduce(packed, group=group)

        count = packed[2 * channels]
        # Only a rank that itself holds <= 1 value per channel can see a group total <= 1 (and then every
        # rank does, so all raise together); the host sync is paid only in that rare case.
        if local_count <= 1 and count.item() <= 1:
            if count.item() == 0:
                # The whole group is empty (e.g. a RoI head with no RoI on any device): like
                # nn.BatchNorm2d on an empty batch, the output is empty and the running statistics
                # stay as they are. The backward still takes part in its all-reduce on every rank.
                count = torch.ones_like(count)
                update_factor = 0.0
            else:
                raise ValueError(
                    f"CrossDeviceBatchNorm2d: expected more than 1 value per channel across the group when "
                    f"training, got {int(count.item())} (input shape {tuple(x.shape)} on this rank)"
                )
        mean = packed[:channels] / count
        var = (packed[channels: 2 * channels] / count - mean * mean).clamp_min(0.0)
        invstd = torch.rsqrt(var + eps)

        # update_factor 0 (momentum=0, as during recomputation) leaves the buffers untouched.
        if running_mean is not None and running_var is not None and update_factor != 0.0:
            with torch.no_grad():
                unbiased = var * (count / (count - 1))
                running_mean.mul_(1.0 - update_factor).add_(mean.to(running_mean.dtype), alpha=update_factor)
                running_var.mul_(1.0 - update_factor).add_(unbiased.to(running_var.dtype), alpha=update_factor)

        mean_a = mean.to(acc)
        invstd_a = invstd.to(acc)
        # The normalisation itself is ATen's fused CPU/CUDA batch_norm in inference form, fed the group
        # statistics: one pass over x instead of the four of a broadcast expression.
        if local_count > 0:
            y = torch.nn.functional.batch_norm(
                xa, mean_a, var.to(acc), _opt(weight, acc), _opt(bias, acc), training=False, eps=eps
            )
        else:  # ATen's CPU kernels divide by the element count (SIGFPE on an empty batch)
            y = xa.clone()
        ctx.save_for_backward(x, weight, mean_a, invstd_a, count.to(acc))
        ctx.group = group
        ctx.eps = eps
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable  # the all-reduce below is not differentiable: double backward must fail loudly
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor):  # type: ignore[override]
        x, weight, mean, invstd, count = ctx.saved_tensors
        channels = x.shape[1]
        acc = mean.dtype
        shape = (1, channels, 1, 1)
        dy = grad_out.to(acc)
        xa = x.to(acc)
        # Per-channel sum(dy * x_hat) and sum(dy) with the group's mean / invstd, in one fused pass: ATen's
        # training-mode BatchNorm backward returns exactly these as its weight and bias gradients.
        # Sums over an empty local batch are zeros, which is exactly this rank's contribution.
        empty = x.numel() == 0
        if empty:
            sum_dy = sum_dy_xhat = torch.zeros(channels, dtype=acc, device=x.device)
        else:
            _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
                dy, xa, _opt(weight, acc), None, None, mean, invstd, True, ctx.eps, [False, True, True]
            )

        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # Skipped when no rank needs the input gradient (the same on every rank: same model).
            packed = torch.cat([sum_dy, sum_dy_xhat])
            collectives.all_reduce(packed, group=ctx.group)
            mean_dy = packed[:channels] / count
            mean_dy_xhat = packed[channels:] / count
            scale = invstd if weight is None else invstd * weight.to(acc)
            # grad_x = scale * (dy - mean_dy - x_hat * mean_dy_xhat) = scale * dy + a * x + c, per channel.
            # a * x + c is one fused pass of batch_norm (mean 0, variance 1 - eps, weight a, bias c), the
            # scale * dy term one in-place addcmul: two passes where the plain expression takes six.
            if empty:
                grad_x = torch.zeros_like(x)
            else:
                a = -scale * invstd * mean_dy_xhat
                c = -scale * mean_dy - a * mean
                unit = torch.full_like(a, 1.0 - ctx.eps)
                grad_x = torch.nn.functional.batch_norm(
                    xa, torch.zeros_like(a), unit, a, c, training=False, eps=ctx.eps
                )
                grad_x.addcmul_(dy, scale.view(shape))
                grad_x = grad_x.to(x.dtype)
        # Parameter gradients are this rank's share only; DDP's gradient all-reduce adds the shares.
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = sum_dy_xhat.to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(grad_out.dtype if weight is None else weight.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


class CrossDeviceBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are shared by a group of devices (MegDet's CGBN).

    Args:
        num_features: channels C of the (N, C, H, W) input.
        eps, momentum, affine, track_running_stats: as in ``nn.BatchNorm2d`` (``momentum=None`` gives
            the cumulative moving average).
        group_size: number of consecutive ranks that share statistics (MegDet's "BN size");
            None means the whole world. The world size must be divisible by it.
        device, dtype: where and in which dtype the parameters and buffers are created.

    Without an initialised process group, with a world or group of size 1, or in eval mode the layer is
    exactly ``nn.BatchNorm2d`` (no communication). In training mode with a group it normalises with the
    group's mean and biased variance and updates the running mean and *unbiased* running variance just
    as ``nn.BatchNorm2d`` would on the concatenated group batch. Statistics and gradient sums are
    reduced in float64 / float32 for half-precision inputs; the output keeps the input dtype.
    Weight and bias gradients are per-rank shares, to be summed (or averaged) across ranks as DDP does.
    All ranks of a group must run the layer in the same order in forward and backward (module docstring).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        group_size: int | None = None,
        *,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        _check_group_size(group_size)
        self.group_size = group_size
        # > 1: split each device's batch into this many groups with statistics of their own ("ghost"
        # batches, Hoffer et al. 2017) and share nothing across devices: how the large-batch study
        # measures small BN groups at a large batch.
        self.local_groups = 1

    def extra_repr(self) -> str:
        extra = f", local_groups={self.local_groups}" if self.local_groups > 1 else ""
        return f"{super().extra_repr()}, group_size={self.group_size}{extra}"

    def _update_factor(self) -> float:
        """nn.BatchNorm2d's bookkeeping in training mode: count the batch, return the running-stat factor."""
        update_factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                update_factor = 1.0 / float(self.num_batches_tracked)
        return update_factor

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if self.training and self.local_groups > 1:
            # Never the group's collectives here, whatever this rank's batch: ranks may hold different
            # numbers of RoIs (0 or 1 included), and only matching calls on every rank may communicate.
            return self._local_groups_forward(input)
        group = _statistics_group(self.group_size) if self.training else None
        if group is None:
            return super().forward(input)

        update_factor = self._update_factor()
        track = self.track_running_stats and self.running_mean is not None
        return _CrossDeviceBatchNormFunction.apply(
            input,
            self.weight,
            self.bias,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.eps,
            update_factor,
            group,
        )

    def _local_groups_forward(self, input: torch.Tensor) -> torch.Tensor:
        """Each of ``local_groups`` contiguous slices of the batch normalised with its own statistics;
        the running statistics move towards the mean of the slices' means and unbiased variances."""
        groups = max(1, min(self.local_groups, input.shape[0]))
        if input.dim() == 4 and input.shape[0] % groups == 0:
            return self._equal_groups_forward(input, groups)
        chunks = torch.tensor_split(input, groups)
        update_factor = self._update_factor()
        out = [
            torch.nn.functional.batch_norm(c, None, None, self.weight, self.bias, True, 0.0, self.eps)
            for c in chunks
        ]
        if self.track_running_stats and self.running_mean is not None and update_factor != 0.0:
            with torch.no_grad():
                stats = [torch.var_mean(c.float(), dim=(0, 2, 3), correction=1) for c in chunks if c[:, 0].numel() > 1]
                if stats:
                    self._update_running(torch.stack([m for _, m in stats]), torch.stack([v for v, _ in stats]),
                                         update_factor)  # fmt: skip
        return torch.cat(out)

    def _equal_groups_forward(self, input: torch.Tensor, groups: int) -> torch.Tensor:
        """Equal slices in one BatchNorm call: (N, C, H, W) seen as (N / G, G * C, H, W), so that each
        (slice, channel) pair is one channel; the call's own running-statistics update (momentum 1, into
        scratch buffers) yields every slice's mean and unbiased variance without a second pass."""
        n, c, h, w = input.shape
        grouped = input.reshape(groups, n // groups, c, h, w).transpose(0, 1).reshape(n // groups, groups * c, h, w)
        update_factor = self._update_factor()
        track = self.track_running_stats and self.running_mean is not None and update_factor != 0.0
        stats_dtype = self.running_mean.dtype if self.running_mean is not None else torch.float32
        mean = torch.zeros(groups * c, device=input.device, dtype=stats_dtype) if track else None
        var = torch.ones(groups * c, device=input.device, dtype=stats_dtype) if track else None
        weight = self.weight.repeat(groups) if self.weight is not None else None
        bias = self.bias.repeat(groups) if self.bias is not None else None
        out = torch.nn.functional.batch_norm(grouped, mean, var, weight, bias, True, 1.0, self.eps)
        if track:
            self._update_running(mean.view(groups, c), var.view(groups, c), update_factor)
        out = out.reshape(n // groups, groups, c, h, w).transpose(0, 1).reshape(n, c, h, w)
        if input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def _update_running(self, means: torch.Tensor, variances: torch.Tensor, update_factor: float) -> None:
        """Running statistics ``update_factor`` of the way to the mean over slices of ``means`` /
        ``variances`` (slices x channels)."""
        with torch.no_grad():
            self.running_mean.lerp_(means.mean(0).to(self.running_mean.dtype), update_factor)
            self.running_var.lerp_(variances.mean(0).to(self.running_var.dtype), update_factor)


def convert_cross_device_bn(module: nn.Module, group_size: int | None = None) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in `module` (torchvision's included) by CrossDeviceBatchNorm2d.

    The new layers reuse the original Parameter and buffer objects, so weights, biases, running
    statistics, ``num_batches_tracked``, device, dtype, ``requires_grad`` and optimizer references are
    all kept; the training flag is copied. ``torchvision.ops.FrozenBatchNorm2d`` (not a BatchNorm2d) and
    other norms are left alone. Returns the converted module (a new object only when `module` itself
    is a BatchNorm2d).
    """
    _check_group_size(group_size)
    if isinstance(module, nn.BatchNorm2d):
        # Built on the meta device: every tensor is replaced by the original one just below.
        new = CrossDeviceBatchNorm2d(
            module.num_features, eps=module.eps, momentum=module.momentum, affine=module.affine,
            group_size=group_size, track_running_stats=module.track_running_stats, device="meta",
        )
        for name in ("weight", "bias"):
            setattr(new, name, getattr(module, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            new.register_buffer(name, getattr(module, name), persistent=name not in module._non_persistent_buffers_set)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        converted = convert_cross_device_bn(child, group_size)
        if converted is not child:
            setattr(module, name, converted)
    return module
