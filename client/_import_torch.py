"""PyTorch import: an ``nn.Sequential``-style module of convolutions (each with an optional batch-norm and activation)
as `register_model` layer dicts.

An ``nn.Sequential`` (nested ones too) is read child by child; a single supported layer is a one-layer model; any other
module is traced with ``torch.fx`` and must call its submodules one after another. The import has inference semantics
whatever mode the module is in: batch-norm uses its running statistics and Dropout is skipped. The module is read,
never changed (weights, buffers, train/eval mode).
"""
import numpy as np

from ._errors import invalid_argument
from ._import_common import LayerChain, require

__all__ = ["torch_layers"]

_SUPPORTED = ("Conv1d/2d/3d", "BatchNorm1d/2d/3d", "ReLU", "ReLU6", "Sigmoid", "Tanh", "SiLU", "GELU", "ELU",
              "Softplus", "Identity", "Dropout")


def torch_layers(module, example_input=None):
    """Map a PyTorch module onto `register_model` layer dicts.

    Parameters
    ----------
    module : torch.nn.Module
        An ``nn.Sequential`` of supported layers, one supported layer, or a module whose ``forward`` calls supported
        submodules in a chain (traced with ``torch.fx``). Its float dtype (float32 or float64) is kept.
    example_input : torch.Tensor or numpy.ndarray, optional
        If given, the module's own forward on it (in eval mode, without autograd; the module's modes are restored)
        is compared with the mapped layers run by ``torch.nn.functional``; a mismatch is a ConvError. This catches a
        ``forward`` that does something the import cannot see.

    Returns
    -------
    list of dict
        One per convolution, channels first (kernel OI*).

    Raises
    ------
    ConvError
        INVALID_ARGUMENT naming the submodule and what is not supported; or naming the extra to install when
        ``torch`` is missing.
    """
    torch = require("torch", "torch", "register_torch")
    if not isinstance(module, torch.nn.Module):
        raise invalid_argument(f"module must be a torch.nn.Module, got {type(module).__name__}")
    chain = LayerChain("module")
    for where, sub in _steps(torch, module, ""):
        _map(torch, chain, where, sub)
    layers = chain.layers()
    if example_input is not None:
        _check(torch, module, layers, example_input)
    return layers


def _where(path, sub):
    return f"module {path!r} ({type(sub).__name__})" if path else f"module ({type(sub).__name__})"


def _is_leaf(torch, sub):
    if isinstance(sub, torch.nn.Sequential):
        return False
    return not list(sub.children()) or type(sub).__module__.startswith("torch.nn")


def _steps(torch, module, path):
    """(where, leaf module) in the order the chain runs them."""
    if isinstance(module, torch.nn.Sequential) and type(module).forward is torch.nn.Sequential.forward:
        steps = []
        for name, child in module.named_children():
            steps += _steps(torch, child, f"{path}.{name}" if path else name)
        return steps
    if _is_leaf(torch, module):
        return [(_where(path, module), module)]
    return _traced_steps(torch, module, path)


def _traced_steps(torch, module, path):
    """A custom module's submodule calls, traced with torch.fx (no example needed); only a chain is accepted."""
    label = _where(path, module)
    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception as err:  # noqa: BLE001 - fx raises many kinds for untraceable Python
        raise invalid_argument(f"{label}: its forward cannot be traced with torch.fx ({type(err).__name__}: {err}); "
                               f"pass an nn.Sequential of supported layers") from None
    steps, previous = [], None
    for node in graph.nodes:
        if node.op == "placeholder":
            if previous is not None:
                raise invalid_argument(f"{label}: forward takes more than one input; a model has one")
            previous = node
            continue
        if node.op == "output":
            if node.args[0] is not previous:
                raise invalid_argument(f"{label}: forward does not return the last submodule's output alone")
            break
        if node.op != "call_module":
            raise invalid_argument(f"{label}: forward has {node.op} {getattr(node.target, '__name__', node.target)}"
                                   f" (fx node {node.name!r}); only calls of submodules in a chain are supported")
        if len(previous.users) != 1:
            users = ", ".join(user.name for user in previous.users)
            raise invalid_argument(f"{label}: a branch: fx node {previous.name!r} feeds {len(previous.users)} nodes "
                                   f"({users}); only a chain (no branches or residual connections) can be registered")
        if tuple(node.args) != (previous,) or node.kwargs:
            raise invalid_argument(f"{label}: forward calls {node.target!r} on something other than the previous "
                                   f"step's output alone (fx node {node.name!r}); only a chain can be registered")
        sub = module.get_submodule(node.target)
        steps += _steps(torch, sub, f"{path}.{node.target}" if path else str(node.target))
        previous = node
    return steps


def _array(tensor):
    """A copy of `tensor` as a numpy array (never a view of the module's storage)."""
    return tensor.detach().to("cpu").numpy().copy()


def _check_dtype(torch, where, tensor):
    if tensor.dtype not in (torch.float32, torch.float64):
        raise invalid_argument(f"{where}: weights of dtype {tensor.dtype} are not supported; the service computes in "
                               f"float32 or float64 (convert the module first, e.g. module.float())")


def _map(torch, chain, where, sub):
    nn = torch.nn
    if isinstance(sub, nn.modules.lazy.LazyModuleMixin) and sub.has_uninitialized_params():
        raise invalid_argument(f"{where}: its parameters are not initialized yet; run the module once first")
    if sub._forward_hooks or sub._forward_pre_hooks:
        raise invalid_argument(f"{where}: it has forward hooks, which change its output in ways the import cannot "
                               f"see; remove them (torch.nn.utils.remove_weight_norm for the old weight_norm)")
    base = next(c for c in type(sub).__mro__ if c.__module__.startswith("torch.nn") or c is object)
    if base is not object and type(sub).forward is not base.forward:
        raise invalid_argument(f"{where}: it subclasses {base.__name__} and overrides forward, which the import "
                               f"cannot read; use {base.__name__} itself")
    if isinstance(sub, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        _conv(torch, chain, where, sub)
    elif isinstance(sub, nn.modules.batchnorm._BatchNorm):
        if sub.running_mean is None or sub.running_var is None:
            raise invalid_argument(f"{where}: track_running_stats=False (statistics of each batch) is not supported; "
                                   f"only running statistics can be folded")
        _check_dtype(torch, where, sub.running_mean)
        channels = sub.num_features
        dtype = _array(sub.running_mean).dtype
        scale = _array(sub.weight) if sub.weight is not None else np.ones(channels, dtype)
        shift = _array(sub.bias) if sub.bias is not None else np.zeros(channels, dtype)
        chain.batchnorm(where, scale, shift, _array(sub.running_mean), _array(sub.running_var), sub.eps)
    elif isinstance(sub, (nn.Identity, nn.modules.dropout._DropoutNd)):
        pass  # skipped: Dropout is the identity at inference
    else:
        chain.activation(where, _activation(nn, where, sub))


def _activation(nn, where, sub):
    simple = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.SiLU: "silu"}
    if type(sub) in simple:
        return simple[type(sub)]
    if isinstance(sub, nn.Hardtanh) and (sub.min_val, sub.max_val) == (0.0, 6.0):
        return "relu6"
    if isinstance(sub, nn.GELU):
        if sub.approximate != "none":
            raise invalid_argument(f"{where}: approximate={sub.approximate!r} is not supported; the service's gelu "
                                   f"is the exact (erf) one, approximate='none'")
        return "gelu"
    if isinstance(sub, nn.ELU):
        if sub.alpha != 1.0:
            raise invalid_argument(f"{where}: alpha={sub.alpha} is not supported; the service's elu has alpha 1")
        return "elu"
    if isinstance(sub, nn.Softplus):
        # torch returns x itself where beta·x > threshold; from 20 on that differs from log1p(exp(x)) by < 2.1e-9.
        if sub.beta != 1 or sub.threshold < 20:
            raise invalid_argument(f"{where}: beta={sub.beta}, threshold={sub.threshold} is not supported; the "
                                   f"service's softplus is log(1 + exp(x)) (beta 1, threshold 20 or more)")
        return "softplus"
    raise invalid_argument(f"{where}: {type(sub).__name__} is not supported; supported: {', '.join(_SUPPORTED)}")


def _conv(torch, chain, where, conv):
    if conv.padding_mode != "zeros":
        raise invalid_argument(f"{where}: padding_mode={conv.padding_mode!r} is not supported; only 'zeros' is (the "
                               f"service pads with zeros)")
    _check_dtype(torch, where, conv.weight)
    kernel = _array(conv.weight)
    bias = _array(conv.bias) if conv.bias is not None else None
    if conv.padding == "valid":
        padding = "valid"
    elif conv.padding == "same":
        # torch's "same" (stride 1 only): a total of d·(k-1), the odd one at the end.
        padding = tuple((d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2)
                        for k, d in zip(conv.kernel_size, conv.dilation))
    else:
        padding = tuple(int(p) for p in conv.padding)
    chain.conv(where, kernel, bias, strides=tuple(conv.stride), padding=padding, dilation=tuple(conv.dilation),
               groups=int(conv.groups))


def _run_layers(torch, layers, x):
    """The layer dicts run with torch.nn.functional (for the example_input check)."""
    functional = torch.nn.functional
    acts = {None: lambda v: v, "relu": functional.relu, "relu6": functional.relu6, "sigmoid": torch.sigmoid,
            "tanh": torch.tanh, "silu": functional.silu, "elu": functional.elu, "gelu": functional.gelu,
            "softplus": functional.softplus}
    for layer in layers:
        kernel = torch.from_numpy(layer["kernel"])
        nsp = kernel.ndim - 2
        padding = layer["padding"]
        if padding != "valid":
            pairs = [(p, p) if isinstance(p, int) else p for p in padding]
            x = functional.pad(x, [v for pair in reversed(pairs) for v in pair])  # F.pad: last dim first
        bias = torch.from_numpy(layer["bias"]) if layer.get("bias") is not None else None
        conv = getattr(functional, f"conv{nsp}d")
        x = conv(x, kernel, bias, stride=layer["strides"], dilation=layer["dilation"], groups=layer["groups"])
        x = acts[layer.get("activation")](x)
    return x


def _check(torch, module, layers, example_input):
    x = torch.as_tensor(example_input)
    dtype = torch.float64 if layers[0]["kernel"].dtype == np.float64 else torch.float32
    if x.dtype != dtype:
        raise invalid_argument(f"example_input has dtype {x.dtype}, the module's weights are {dtype}")
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with torch.no_grad():
            expected = module(x)
            got = _run_layers(torch, layers, x.cpu())
    except (RuntimeError, ValueError, TypeError) as err:  # torch's errors for a wrong shape or channel count
        raise invalid_argument(f"example_input of shape {tuple(x.shape)} cannot be run through the module "
                               f"({type(err).__name__}: {err})") from None
    finally:
        for m, training in modes:
            m.training = training
    expected = expected.detach().cpu().numpy()
    got = got.numpy()
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    if expected.shape != got.shape or not np.allclose(got, expected, rtol=1e-3, atol=1e-3 * scale):
        diff = f"shape {got.shape} vs {expected.shape}" if expected.shape != got.shape else \
            f"max abs difference {float(np.abs(got - expected).max()):.3g}"
        raise invalid_argument(f"the module's forward on example_input differs from its layers run in order ({diff});"
                               f" its forward does more than chain its submodules")

