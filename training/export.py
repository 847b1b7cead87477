"""Old home of the export step, kept for one release: ``training.release.export`` (and ``training.io``).

``python -m training.export add-fp16 MODEL_DIR CHECKPOINT_DIR`` (Dockerfile.gpu) still works;
the new spelling is ``python -m training add-fp16 MODEL_DIR CHECKPOINT_DIR``.
"""

import sys

from training.io import atomic_replace_dir, write_json_atomic
from training.release.export import (
    CUDA_PROVIDER,
    FP16_FILE,
    TOKENIZER_FILES,
    add_fp16_file,
    convert_fp16,
    export_model_folder,
    export_onnx,
    main,
)

__all__ = [
    "CUDA_PROVIDER",
    "FP16_FILE",
    "TOKENIZER_FILES",
    "add_fp16_file",
    "atomic_replace_dir",
    "convert_fp16",
    "export_model_folder",
    "export_onnx",
    "write_json_atomic",
]

if __name__ == "__main__":
    main(sys.argv[1:])
