"""Request fields that predict and the OpenAI routes spell and mean alike, declared once.

A field here whose name is also a ``SamplingParams`` field is passed through as it is (``sampling_values``):
adding one such parameter to both protocols is a field here and a field there.
"""

from __future__ import annotations

from typing import Any

import pydantic
from pydantic import StrictBool, StrictStr

from starcoder_serving.engine.sampling_params import SamplingParams, Seed

# What ``stop`` must be, in the one sentence a wrong one gets (field_errors.py).
STOP_SHAPE = "a string or a list of strings"

Stop = StrictStr | list[StrictStr]


def stop_sequences(stop: str | list[str] | None) -> tuple[str, ...]:
    """The one normal form of every protocol's stop field: a tuple of strings."""
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


class CommonFields(pydantic.BaseModel):
    # strict: "0.5" is not a float and 1 is not a bool; an int is still accepted for a float.
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)

    # Any number here: validation refuses more than max_stop_sequences with a message giving the limit.
    stop: Stop | None = None
    seed: Seed | None = None
    # vLLM's: keep generating past the end of text, to the token limit (benchmark clients send it).
    ignore_eos: StrictBool | None = None

    def sampling_values(self) -> dict[str, Any]:
        """The sent fields of this class that are ``SamplingParams`` fields too, in its terms."""
        names = set(CommonFields.model_fields) & self.model_fields_set & set(SamplingParams.model_fields)
        values = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        if "stop" in values:
            values["stop"] = stop_sequences(values["stop"])
        return values
