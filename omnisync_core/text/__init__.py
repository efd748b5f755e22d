"""Text conditioning: the umT5 encoder of Wan2.1-based families (HuMo, InfiniteTalk), its tokenizer, and cached
prompt features. Pure PyTorch + sentencepiece; nothing here imports transformers."""

from .prompt import (
    HUMO_DEFAULT_PROMPT, PROMPT_EMBEDS_FORMAT, TEXT_LEN, WAN_DEFAULT_NEGATIVE_PROMPT, PromptEmbeds, PromptEmbedsError,
    encode_prompt_file, encode_prompt_pair, encode_prompts, load_prompt_embeds, save_prompt_embeds,
)
from .tokenizer import SPIECE_KEY, UMT5Tokenizer, clean_text
from .umt5 import UMT5_PRESETS, UMT5Config, UMT5Encoder, load_umt5, umt5_config_from_shapes, umt5_expected_shapes

__all__ = ["HUMO_DEFAULT_PROMPT", "PROMPT_EMBEDS_FORMAT", "TEXT_LEN", "WAN_DEFAULT_NEGATIVE_PROMPT", "PromptEmbeds",
           "PromptEmbedsError", "encode_prompt_file", "encode_prompt_pair", "encode_prompts", "load_prompt_embeds",
           "save_prompt_embeds", "SPIECE_KEY", "UMT5Tokenizer", "clean_text", "UMT5_PRESETS", "UMT5Config",
           "UMT5Encoder", "load_umt5", "umt5_config_from_shapes", "umt5_expected_shapes"]
