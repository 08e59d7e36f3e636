"""Redis keys of the attribution touches: `serving.tracking` writes them, `outcomes.erasure` deletes a user's."""

from __future__ import annotations

from typing import get_args

from adloop.settings import Settings

# what a conversion may be attributed to, when it names no click: the user's last click or last impression
USER_TOUCH_MODELS: tuple[str, ...] = get_args(Settings.model_fields["attribution_model"].annotation)


def click_touch_key(click_id: str) -> str:
    return f"adloop:touch:click:{click_id}"


def user_touch_key(model: str, user_id: str) -> str:
    return f"adloop:touch:user:{model}:{user_id}"
