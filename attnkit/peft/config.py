"""The configuration every PEFT method shares, and its JSON round trip (HF PEFT's adapter_config.json).

Field names follow HF PEFT (``peft_type``, ``task_type``, ``r``, ``lora_alpha``, ``num_virtual_tokens``, ...)
so that adapter_config.json means the same thing to both libraries.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

PEFT_TYPES: dict[str, type["PeftConfig"]] = {}  # "LORA" → LoraConfig, filled by each method's config module


@dataclass
class PeftConfig:
    task_type: str = "CAUSAL_LM"
    inference_mode: bool = False

    peft_type: ClassVar[str] = ""
    is_prompt_learning: ClassVar[bool] = False  # prompt, prefix, P-tuning: no layers replaced

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.peft_type:
            PEFT_TYPES[cls.peft_type] = cls

    def to_dict(self) -> dict[str, Any]:
        return {"peft_type": self.peft_type, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], strict: bool = False) -> "PeftConfig":
        """The config class named by ``d["peft_type"]``; fields it does not know are an error with ``strict``,
        else dropped (HF PEFT writes many fields for features attnkit does not have)."""
        kind = d.get("peft_type")
        if kind not in PEFT_TYPES:
            raise ValueError(f"peft_type {kind!r} is not supported (supported: {', '.join(sorted(PEFT_TYPES))})")
        target = PEFT_TYPES[kind]
        known = {f.name for f in fields(target)}
        unknown = sorted(set(d) - known - {"peft_type"})
        if strict and unknown:
            raise ValueError(f"{target.__name__}: unknown fields {unknown}")
        return target(**{k: v for k, v in d.items() if k in known})


def matches(module_name: str, targets: str | list[str] | None) -> bool:
    """PEFT's rule: a string is a regex the whole module name must match; a list holds names that must
    equal the module name or its last dotted components (``"q_proj"`` matches ``layers.0.self_attn.q_proj``)."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, module_name) is not None
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


def pattern_value(module_name: str, pattern: dict[str, Any], default: Any) -> Any:
    """``rank_pattern`` / ``alpha_pattern`` lookup: the first key that is a suffix (or regex) of the name."""
    for key, value in pattern.items():
        if re.fullmatch(rf"(.*\.)?{key}", module_name):
            return value
    return default
