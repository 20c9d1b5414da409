"""audiotok: audio to discrete tokens and back, with the Improved RVQGAN (DAC) codec."""

from .formats.codedataset import CodeDataset
from .formats.codefile import CodeFile
from .identity import CodecIdentity
from .nn.config import PRESETS, DACConfig
from .nn.model import DAC
from .tokenizer import AudioTokenizer, EncodedAudio

__version__ = "0.1.0"

__all__ = ["AudioTokenizer", "EncodedAudio", "CodeFile", "CodeDataset", "CodecIdentity", "DACConfig", "DAC", "PRESETS",
           "__version__"]
