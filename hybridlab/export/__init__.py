"""Export found architectures, with their trained weights, in formats that trainers load.

- ``hybridlab``: arch.yaml + model.safetensors + model card; always faithful.
- ``mamba_ssm``: ``MambaLMHeadModel``'s config.json + weights in its names (see ``mamba_ssm.py``
  for what it cannot represent).
- ``megatron``: Megatron-LM's hybrid override pattern and arguments (see ``megatron.py``).
- ``hf``: a transformers NemotronH, Bamba or GraniteMoeHybrid model folder (see ``hf.py``).

Every export folder also holds arch.yaml, a model card (README.md), export.json (manifest with
sha256 of each file) and, when the model was trained on text, its tokenizer
(``tokenizer_files.py``). A format that cannot represent an architecture refuses with the layer,
field and reason, or with ``lossy`` writes its closest config, no weights, and LOSSY.md.

Exporting from a study database is ``hybridlab.export.study.export_study`` (imported on demand:
it needs Optuna, which the ``hybridlab`` command should not load before it is asked to); from a
``hybridlab train`` folder, ``hybridlab.export.trained.export_checkpoint``.
"""

from hybridlab.export.card import Provenance
from hybridlab.export.cli import add_export_arguments, export_command
from hybridlab.export.common import Change, ExportError, ExportRefused, verify_export
from hybridlab.export.mamba_ssm import from_mamba_ssm
from hybridlab.export.mamba_ssm import load as load_mamba_ssm
from hybridlab.export.writer import FORMATS, ExportResult, export_model, load_hybridlab

__all__ = [
    "FORMATS",
    "Change",
    "ExportError",
    "ExportRefused",
    "ExportResult",
    "Provenance",
    "add_export_arguments",
    "export_command",
    "export_model",
    "from_mamba_ssm",
    "load_hybridlab",
    "load_mamba_ssm",
    "verify_export",
]
