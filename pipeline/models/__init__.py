"""Networks and the LightningModule that trains them; ``MODELS`` maps a name to a builder."""

from pipeline.models.cnn import build_cnn

MODELS = {"cnn": build_cnn}
