"""torch.func's transforms and forward-mode AD, as the layers need to know of them: the one place
that reads functorch's internals (they have no public API in torch 2.11-2.13)."""
import torch


def transforms_active():
    """Whether a torch.func transform (vmap, grad, jacrev, ...) is active now."""
    return torch._C._are_functorch_transforms_active()


def forward_ad_active():
    """Whether forward-mode AD (torch.autograd.forward_ad, jvp) is active now."""
    return torch.autograd.forward_ad._current_level >= 0


def only_vmap_active():
    """Whether the torch.func transforms active now are all vmap (the kernels' op has a batching
    rule: autograd.py), and forward-mode AD is off."""
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    return (not forward_ad_active() and
            all(i.key() == torch._C._functorch.TransformType.Vmap for i in retrieve_all_functorch_interpreters()))


def is_batched(t):
    """Whether t is a batched tensor of vmap over the backward (torch.func's, or the legacy one that
    gradcheck's batched-gradient check uses)."""
    functorch = torch._C._functorch
    return t is not None and (functorch.is_batchedtensor(t) or functorch.is_legacy_batchedtensor(t))
