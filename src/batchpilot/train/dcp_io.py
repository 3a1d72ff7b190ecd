"""``torch.distributed.checkpoint`` (DCP) for the runner: sharded save and load, read safely.

- :func:`save` / :func:`start_async_save`: ``dcp.save`` / ``dcp.async_save`` of the model and optimizer state
  dicts (``get_state_dict``: DTensor shards under FSDP2 and tensor parallelism) into ``DIR/dcp``;
- :func:`load_into`: ``dcp.load`` into the current model's and optimizer's state dicts, whatever layout and
  world size wrote them, then ``set_state_dict``;
- :func:`read_model_state`: the whole model state dict of a checkpoint without a model or process group
  (tensors allocated from ``.metadata``), for ``--model RUN_DIR``, the Hugging Face export and tests.

Reading never unpickles arbitrary objects: :class:`SafeReader` loads ``.metadata`` with an unpickler that
admits DCP's metadata classes, ``torch.Size``, dtypes and paths only (``FileSystemReader.read_metadata``
calls ``pickle.load``), and :class:`SafeLoadPlanner` loads non-tensor items (optimizer hyper-parameters)
with ``weights_only=True`` (``DefaultLoadPlanner.load_bytes`` uses ``weights_only=False``). torch 2.13.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from batchpilot.errors import BatchpilotError

DCP = "dcp"
"""The checkpoint's DCP subdirectory."""

_ALLOWED = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("collections", "OrderedDict"),
}
_ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata",)


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP metadata only: its dataclasses and enums, ``torch.Size``, dtypes, layouts and paths."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALLOWED or module in _ALLOWED_MODULES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP metadata")


class SafeReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` is read with :class:`_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with (Path(self.path) / ".metadata").open("rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError("the .metadata file does not hold DCP metadata")
        storage = metadata.storage_meta if metadata.storage_meta is not None else StorageMeta()
        storage.load_id = self.load_id
        metadata.storage_meta = storage
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that loads non-tensor items with ``weights_only=True``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def _alone() -> bool:
    """No process group: DCP then reads and writes as one process."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns on every single-process save and load ("torch.distributed is disabled … assuming the intent
    is to save in a single process"): the runner means it, and a warning would be an extra stderr line. The
    filter is process-wide (an asynchronous save warns from its writer thread, after this context)."""
    warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
    yield


def state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``{"model": …, "optimizer": …}`` as ``get_state_dict`` returns them (sharded where the model is)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd}


def unwrap(exc: BaseException) -> BaseException:
    """The first rank's own exception inside DCP's ``CheckpointException`` (a ``BaseException`` carrying every
    failed rank's exception and traceback), so a full disk reads as the ``OSError``/``RuntimeError`` it is."""
    if isinstance(exc, CheckpointException):
        failures = list(exc.failures.values())
        return failures[0][0] if failures else RuntimeError(str(exc).splitlines()[0])
    return exc


def save(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """``dcp.save`` into ``directory / "dcp"`` (a collective when a process group exists)."""
    try:
        with _quiet():
            dcp.save(state_dicts(model, optimizer), checkpoint_id=str(directory / DCP), no_dist=_alone())
    except CheckpointException as exc:
        raise unwrap(exc) from None


def start_async_save(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, group: Any) -> Any:
    """``dcp.async_save`` into ``directory / "dcp"`` on ``group``; returns its future."""
    with _quiet():
        return dcp.async_save(state_dicts(model, optimizer), checkpoint_id=str(directory / DCP),
                              process_group=group, no_dist=_alone())


def load_into(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore model and optimizer from ``directory / "dcp"`` (resharded to this layout and world size)."""
    state = state_dicts(model, optimizer)
    try:
        with _quiet():
            dcp.load(state, storage_reader=SafeReader(str(directory / DCP)), planner=SafeLoadPlanner(),
                     no_dist=_alone())
    except (pickle.UnpicklingError, RuntimeError, ValueError, KeyError, OSError, CheckpointException) as exc:
        raise BatchpilotError(f"checkpoint {str(directory)!r} cannot be read: "
                              f"{' '.join(str(unwrap(exc)).split())[:200]}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def read_model_state(directory: Path) -> dict[str, torch.Tensor]:
    """The whole model state dict of checkpoint ``directory`` (one process, no model needed)."""
    return read_tensors(directory, "model")


def read_tensors(directory: Path, section: str) -> dict[str, torch.Tensor]:
    """Every tensor of ``section`` (``model`` or ``optimizer``) of checkpoint ``directory``, whole, by its
    flattened key (``optimizer``: ``state.<parameter>.exp_avg``…), allocated from ``.metadata``."""
    reader = SafeReader(str(directory / DCP))
    try:
        metadata = reader.read_metadata()
    except (pickle.UnpicklingError, OSError, EOFError, AttributeError, TypeError) as exc:
        raise BatchpilotError(f"checkpoint {str(directory)!r} cannot be read: {' '.join(str(exc).split())[:200]}") from None
    tensors = {key.removeprefix(f"{section}."): torch.empty(meta.size, dtype=meta.properties.dtype)
               for key, meta in metadata.state_dict_metadata.items()
               if key.startswith(f"{section}.") and isinstance(meta, TensorStorageMetadata)}
    state = {section: tensors}
    try:
        with _quiet():
            dcp.load(state, storage_reader=SafeReader(str(directory / DCP)), planner=SafeLoadPlanner(), no_dist=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, KeyError, OSError, CheckpointException) as exc:
        raise BatchpilotError(f"checkpoint {str(directory)!r} cannot be read: "
                              f"{' '.join(str(unwrap(exc)).split())[:200]}") from None
    return state[section]
