"""The private APIs of other packages that moe-ds relies on, checked at start-up.

A missing one means an untested release is installed: the check names the package, its installed version and
the version moe-ds is tested with (constraints.txt), instead of failing later with an AttributeError.
"""

import importlib
import logging
from importlib import metadata

# dotted path of the attribute -> the package (distribution) that provides it
PRIVATE_APIS = {
    "deepspeed.comm.torch.build_shm_op": "deepspeed",
    "transformers.Trainer._init_training_state": "transformers",
    "transformers.training_args.is_torch_bf16_gpu_available": "transformers",
    "accelerate.state.AcceleratorState._reset_state": "accelerate",
    "accelerate.state.GradientState._reset_state": "accelerate",
}
TESTED = {"deepspeed": "0.19.8", "transformers": "5.23.0", "accelerate": "1.15.0"}  # as pinned in constraints.txt


class CompatibilityError(RuntimeError):
    """An installed package lacks an API moe-ds uses (the message names package and versions)."""


def require(*paths: str, strict: bool = True) -> bool:
    """Check that each dotted attribute path of ``PRIVATE_APIS`` exists.

    Args:
        strict: raise on a missing API; False logs a warning instead (for APIs moe-ds can do without).

    Returns:
        True when all exist.

    Raises:
        CompatibilityError: (strict) naming the package, its installed version and the tested one.
    """
    for path in paths:
        module_path, _, attribute = path.rpartition(".")
        parts = module_path.split(".")
        obj, found = None, False
        for split in range(len(parts), 0, -1):  # the longest importable module prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:split]))
            except ImportError:
                continue
            try:
                for name in parts[split:] + [attribute]:
                    obj = getattr(obj, name)
                found = True
            except AttributeError:
                pass
            break
        if not found:
            package = PRIVATE_APIS.get(path, parts[0])
            try:
                installed = metadata.version(package)
            except metadata.PackageNotFoundError:
                installed = "not installed"
            message = (f"{package} {installed} has no {path}, which moe-ds uses; moe-ds is tested with "
                       f"{package}=={TESTED.get(package, '?')} (constraints.txt): install that version")
            if strict:
                raise CompatibilityError(message)
            logging.getLogger("moe_ds").warning(message)
            return False
    return True
