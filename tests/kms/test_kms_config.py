"""The `kms:` section of a site configuration: timeouts bounded where the file is parsed."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from gateway.initdemo import DemoLayout
from kms.client import Timeouts
from kms.config import KmsClientConfig


def _section(demo: DemoLayout, **extra: Any) -> dict[str, Any]:
    return {"url": "https://127.0.0.1:1", "sae_id": "sae-a", "ca": demo.pki / "ca.pem",
            "cert": demo.pki / "sae-a.pem", "key": demo.pki / "sae-a.key", **extra}


def test_total_timeout_reaches_the_client(demo: DemoLayout) -> None:
    assert KmsClientConfig.model_validate(_section(demo)).timeouts() == Timeouts()
    c = KmsClientConfig.model_validate(_section(demo, total_timeout=4, read_timeout=2,
                                                connect_timeout=1))
    assert c.timeouts() == Timeouts(1.0, 2.0, 4.0)


@pytest.mark.parametrize(("extra", "message"), [
    ({"total_timeout": float("nan")}, "finite number"),
    ({"read_timeout": float("inf")}, "finite number"),
    ({"connect_timeout": 1e300}, "less than or equal to 3600"),
    ({"total_timeout": 0}, "greater than 0"),
    ({"total_timeout": 5, "read_timeout": 10}, "total must be at least connect and read"),
])
def test_timeouts_out_of_bounds_are_refused(demo: DemoLayout, extra: dict[str, Any],
                                            message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        KmsClientConfig.model_validate(_section(demo, **extra))
