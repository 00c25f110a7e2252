"""Parameter-efficient fine-tuning: LoRA, bottleneck adapters, prefix / prompt / P-tuning and IA³ on
attnkit's Llama, GPT-2 and BERT models, several named adapters per base, HF PEFT's file format.

    peft = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    peft.print_trainable_parameters()
    ...train...
    peft.save_pretrained("out/adapter")            # loads in HF PEFT too
"""

from .adapter import BottleneckConfig
from .config import PeftConfig
from .ia3 import IA3Config
from .lora import LoraConfig
from .p_tuning import PromptEncoderConfig
from .peft_model import PeftModel, get_peft_model
from .prefix_tuning import PrefixTuningConfig
from .prompt_tuning import PromptTuningConfig
from .save_load import AdapterLoadError

METHODS = {
    "lora": LoraConfig, "adapter": BottleneckConfig, "prefix": PrefixTuningConfig, "prompt": PromptTuningConfig,
    "ptuning": PromptEncoderConfig, "ia3": IA3Config,
}

__all__ = ["METHODS", "AdapterLoadError", "BottleneckConfig", "IA3Config", "LoraConfig", "PeftConfig", "PeftModel",
           "PrefixTuningConfig", "PromptEncoderConfig", "PromptTuningConfig", "get_peft_model"]
