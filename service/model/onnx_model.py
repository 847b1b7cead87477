"""Load a model folder and run it with onnxruntime: the only module that touches ONNX.

Loading checks everything it can before serving (manifest, file hash, session, output
shape), so a wrong or corrupt model fails at start-up with a message that names the
problem, never at the first request with a numpy traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pydantic import ValidationError

from service.contract.policy import InputEncoder
from service.model.int8_weights import WeightSetting, adapt_weights, resolve_weight_sign
from service.model.manifest import MANIFEST_FILE, Manifest, ModelFile, read_manifest, sha256_file

log = logging.getLogger("uniguard.inference")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PROVIDER = CPU  # the default provider (int8 model file)
PROVIDER_CHOICES = {"cpu": CPU, "cuda": CUDA}
FEED_NAMES = ("input_ids", "attention_mask", "token_type_ids")


class ModelLoadError(RuntimeError):
    """A model folder that cannot be served; the message says which file and why."""


def select_provider(requested: str, available: Sequence[str], manifest: Manifest) -> tuple[str, ModelFile]:
    """Which execution provider serves, and from which of the manifest's files.

    ``requested``: ``cpu`` (the int8 file on CPUExecutionProvider), ``cuda`` (the fp16 file
    on CUDAExecutionProvider; an error if either is missing) or ``auto`` (CUDA when
    onnxruntime-gpu offers it *and* the manifest lists a CUDA file, else CPU).
    """
    has_cuda_file = any(f.provider == CUDA for f in manifest.files)
    if requested == "cuda":
        if CUDA not in available:
            raise ModelLoadError(
                f"UNIGUARD_PROVIDER=cuda but this onnxruntime offers {list(available)}: install the gpu extra "
                "(onnxruntime-gpu instead of onnxruntime) and run on a machine with an NVIDIA driver"
            )
        if not has_cuda_file:
            raise ModelLoadError(
                f"UNIGUARD_PROVIDER=cuda but the manifest lists no model file for {CUDA} (export it with fp16)"
            )
        return CUDA, manifest.model_file(CUDA)
    if requested == "auto" and CUDA in available and has_cuda_file:
        return CUDA, manifest.model_file(CUDA)
    if requested not in ("auto", "cpu"):
        raise ModelLoadError(f"unknown provider {requested!r}: use auto, cpu or cuda")
    if requested == "auto" and CUDA in available:
        log.warning("CUDAExecutionProvider is available but the manifest lists no fp16 CUDA file: serving the CPU file")
    try:
        return CPU, manifest.model_file(CPU)
    except KeyError:
        if CUDA in available and has_cuda_file:  # a GPU-only folder asked for auto/cpu
            raise ModelLoadError(f"the manifest lists no model file for {CPU}; use UNIGUARD_PROVIDER=cuda") from None
        raise


def path_inside(folder: Path, rel: str) -> Path:
    """``folder / rel`` for a path named in a manifest; ModelLoadError if it leaves the folder."""
    path = (folder / rel).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise ModelLoadError(f"{folder}: manifest path {rel!r} points outside the model folder")
    return path


def _preload_cuda_libraries() -> None:
    """onnxruntime-gpu installed with its ``cuda,cudnn`` extras finds the NVIDIA pip wheels'
    libraries only once they are preloaded (no-op for a system-wide CUDA install)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as exc:  # missing wheels: the system libraries may still do
            log.warning("onnxruntime.preload_dlls failed: %s", exc)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e: np.ndarray = np.exp(z)
    probs: np.ndarray = e / e.sum(axis=-1, keepdims=True)  # numpy's stubs type keepdims reductions as Any
    return probs


class OnnxModel:
    """An onnxruntime session plus the encoder and manifest that say how to feed it.

    ``run`` is synchronous and meant to be called from one executor thread at a time (the
    batcher's); onnxruntime parallelises inside a call with ``intra_op_num_threads``.
    """

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        session: ort.InferenceSession,
        encoder: InputEncoder,
        *,
        io_binding: bool = False,
        device_id: int = 0,
        shared_session: ort.InferenceSession | None = None,
    ) -> None:
        self.folder = folder
        # fewer intra-op threads, for workers calling the model concurrently (``run_shared``)
        self.shared_session = shared_session
        self.manifest = manifest
        self.session = session
        self.encoder = encoder
        # onnxruntime ships no types: name what the session gives back.
        self.provider: str = session.get_providers()[0]
        served = next((f for f in manifest.files if f.provider == self.provider), manifest.files[0])
        self.precision = served.precision
        # IO binding: inputs copied to the device once, logits left there and copied back once.
        self.io_binding = io_binding
        self._device = ("cuda", device_id) if self.provider == CUDA else ("cpu", 0)
        self.input_names: list[str] = [i.name for i in session.get_inputs()]
        unknown = [n for n in self.input_names if n not in FEED_NAMES]
        if unknown:
            raise ModelLoadError(f"{folder}: model expects inputs {unknown} that the service cannot feed")
        self.output_name: str = next(
            (o.name for o in session.get_outputs() if o.name == "logits"), session.get_outputs()[0].name
        )
        self.unsafe_label = manifest.unsafe_label
        self.pad_id = self._pad_id()
        self._check_output()

    @property
    def id(self) -> str:
        """``name@version``: names the answering model in every response."""
        return f"{self.manifest.name}@{self.manifest.version}"

    @classmethod
    def load(
        cls,
        folder: Path | str,
        threads: int = 1,
        *,
        provider: str = "auto",
        device_id: int = 0,
        io_binding: bool | None = None,
        spinning: bool = True,
        int8_weights: WeightSetting = "auto",
        worker_threads: int | None = None,
    ) -> OnnxModel:
        """Check and load a model folder. ``provider``: auto | cpu | cuda (see ``select_provider``);
        ``io_binding``: None = on for CUDA, off for CPU; ``spinning``: onnxruntime's intra-op
        threads busy-wait for work (fastest alone, but they take the CPU from an event loop
        sharing the machine: the service turns it off); ``int8_weights``: the integer GEMM
        weights' signedness on CPU (``service.model.int8_weights``: the same scores, the kernel's speed);
        ``worker_threads``: also a session of that many intra-op threads for ``run_shared`` (CPU,
        when it differs from ``threads``: the adaptive layout of ``service.core.batcher``)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelLoadError(f"model folder {folder} does not exist (set UNIGUARD_MODEL_DIR)")
        manifest_path = folder / MANIFEST_FILE
        if not manifest_path.is_file():
            raise ModelLoadError(f"{manifest_path} is missing: not a model folder")
        try:
            manifest = read_manifest(folder)
        except (ValidationError, ValueError, OSError) as exc:
            raise ModelLoadError(f"{manifest_path} is invalid: {exc}") from exc
        try:
            chosen, entry = select_provider(provider, ort.get_available_providers(), manifest)
        except KeyError as exc:
            raise ModelLoadError(f"{manifest_path}: {exc.args[0]}") from exc
        model_path = path_inside(folder, entry.path)
        tokenizer_path = path_inside(folder, manifest.tokenizer_file)
        for path in (model_path, tokenizer_path):
            if not path.is_file():
                raise ModelLoadError(f"{path} is missing (listed in {manifest_path})")
        actual = sha256_file(model_path)
        if actual != entry.sha256:
            raise ModelLoadError(
                f"{model_path}: sha256 {actual[:12]}… does not match manifest {entry.sha256[:12]}… (corrupt or "
                "replaced file)"
            )
        try:
            encoder = InputEncoder.from_file(
                tokenizer_path, manifest.input_template, manifest.max_length, manifest.stride
            )
        except Exception as exc:  # tokenizers raises plain Exception on a bad file
            raise ModelLoadError(f"{tokenizer_path}: cannot load tokenizer: {exc}") from exc
        weight_sign = resolve_weight_sign(int8_weights)
        source: str | bytes = str(model_path)
        rewritten = 0
        if chosen == CPU and entry.precision == "int8":
            try:
                adapted, rewritten = adapt_weights(model_path, weight_sign)
            except Exception:  # onnx raises DecodeError and friends: onnxruntime's load says why below
                adapted = None
            source = adapted if adapted is not None else source
        shared = None
        try:
            session = ort.InferenceSession(
                source, cls._session_options(threads, spinning), providers=cls._providers(chosen, device_id)
            )
            if chosen == CPU and worker_threads is not None and worker_threads != threads:
                shared = ort.InferenceSession(source, cls._session_options(worker_threads, spinning), providers=[CPU])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise ModelLoadError(f"{model_path}: onnxruntime cannot load it: {exc}") from exc
        if session.get_providers()[0] != chosen:
            # onnxruntime-gpu without a usable GPU/driver silently falls back to CPU: the fp16
            # file must not be served that way.
            if provider == "cuda":
                raise ModelLoadError(
                    f"{model_path}: {chosen} could not be initialised (no GPU or driver?); got "
                    f"{session.get_providers()}"
                )
            log.warning(
                "CUDA could not be initialised; serving the CPU file",
                extra={"fields": {"providers": session.get_providers()}},
            )
            return cls.load(
                folder,
                threads,
                provider="cpu",
                io_binding=io_binding,
                spinning=spinning,
                int8_weights=int8_weights,
                worker_threads=worker_threads,
            )
        use_binding = chosen == CUDA if io_binding is None else io_binding
        model = cls(
            folder, manifest, session, encoder, io_binding=use_binding, device_id=device_id, shared_session=shared
        )
        log.info(
            "model loaded",
            extra={
                "fields": {
                    "model": model.id,
                    "path": str(folder),
                    "inputs": model.input_names,
                    "provider": chosen,
                    "file": entry.path,
                    "precision": entry.precision,
                    "int8_weights": weight_sign if entry.precision == "int8" else None,
                    "int8_weights_rewritten": rewritten,
                    "io_binding": use_binding,
                    "threads": threads,
                    "worker_threads": worker_threads if shared is not None else None,
                }
            },
        )
        return model

    @staticmethod
    def _providers(chosen: str, device_id: int) -> list[str | tuple[str, dict[str, object]]]:
        if chosen == CUDA:
            _preload_cuda_libraries()
            return [(CUDA, {"device_id": device_id, "arena_extend_strategy": "kSameAsRequested"}), CPU]
        return [CPU]

    @staticmethod
    def _session_options(threads: int, spinning: bool = True) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        return so

    def _pad_id(self) -> int:
        # Padded positions are masked out; [PAD] (0 for BERT) is what training padded with.
        tid = self.encoder.token_id("[PAD]")
        return tid if tid is not None else 0

    def _check_output(self) -> None:
        shape = next(o.shape for o in self.session.get_outputs() if o.name == self.output_name)
        labels = shape[-1] if shape and isinstance(shape[-1], int) else None
        if labels is not None and not 0 <= self.unsafe_label < labels:
            raise ModelLoadError(
                f"{self.folder}: manifest unsafe_label {self.unsafe_label} but the model outputs {labels} logits"
            )

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        """Unsafe probability of each row of a padded [batch, seq] int64 batch."""
        return self._run(self.session, input_ids, attention_mask, token_type_ids)

    def run_shared(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        """``run`` on the session with ``worker_threads`` intra-op threads (``run`` without one)."""
        return self._run(self.shared_session or self.session, input_ids, attention_mask, token_type_ids)

    def _run(
        self,
        session: ort.InferenceSession,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        token_type_ids: np.ndarray,
    ) -> np.ndarray:
        arrays = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        feeds = {name: np.ascontiguousarray(arrays[name], dtype=np.int64) for name in self.input_names}
        if self.io_binding:
            binding = session.io_binding()
            for name, array in feeds.items():
                binding.bind_cpu_input(name, array)
            binding.bind_output(self.output_name, *self._device)
            session.run_with_iobinding(binding)
            (logits,) = binding.copy_outputs_to_cpu()
        else:
            (logits,) = session.run([self.output_name], feeds)
        return softmax(np.asarray(logits, dtype=np.float32))[:, self.unsafe_label]

    def warm_up(self) -> None:
        """Run short and full-length batches once so first requests do not pay for allocation."""
        for batch, length in ((1, 8), (2, self.manifest.max_length)):
            ids = np.full((batch, length), self.pad_id, dtype=np.int64)
            mask = np.ones((batch, length), dtype=np.int64)
            for run in (self.run, self.run_shared) if self.shared_session is not None else (self.run,):
                probs = run(ids, mask, np.zeros_like(ids))
                if probs.shape != (batch,) or not np.all(np.isfinite(probs)):
                    raise ModelLoadError(f"{self.folder}: warm-up produced {probs.shape} / non-finite probabilities")
