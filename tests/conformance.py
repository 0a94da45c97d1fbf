"""What the conformance kit (`adapters.testing`) knows core does not do yet, shared by the
kit's runs against LoRA, ReFT and the example plugin.

Each entry marks one check ``xfail(strict=True)``: when the missing piece lands the check
passes, pytest reports XPASS(strict), and the entry must be deleted here.
"""

from __future__ import annotations

CORE_GAPS: dict[str, str] = {}
