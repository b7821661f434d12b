"""Networks and the LightningModule that trains them; ``MODELS`` maps a name to a builder."""

from pathlib import Path

from pipeline.models.cnn import build_cnn

MODELS = {"cnn": build_cnn}

# Where train writes the model and evaluate/register read it.
MODELS_DIR = Path("models")
