"""The instance price table and what a configuration costs.

The table (``instances.json`` next to this file, or ``--prices FILE`` in the same form) lists
instance types with their hourly price, vCPUs, memory and GPUs, and the date the prices were taken.
``--instance NAME`` picks one; ``--price-per-hour`` prices your own machine instead; by default the
cheapest entry with this machine's vCPUs and GPUs is used, and the report says which. Prices from
a table dated more than ``STALE_AFTER_DAYS`` ago come with a warning to check them.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmserve.bench import BenchUsageError

DEFAULT_TABLE = Path(__file__).with_name("instances.json")
STALE_AFTER_DAYS = 365


@dataclass(frozen=True)
class Instance:
    name: str
    vcpus: int
    memory_gib: float
    gpus: int
    gpu: str | None
    hourly: float


@dataclass(frozen=True)
class PriceTable:
    date: str
    currency: str
    source: str
    instances: tuple[Instance, ...]

    @classmethod
    def load(cls, path: Path | None = None) -> PriceTable:
        path = path or DEFAULT_TABLE
        try:
            data = json.loads(path.read_text())
            instances = tuple(Instance(**row) for row in data["instances"])
            return cls(str(data["date"]), str(data.get("currency", "USD")), str(data.get("source", "")), instances)
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise BenchUsageError(f"--prices {path}: not a price table ({exc}); see {DEFAULT_TABLE.name} for the form") from None

    def find(self, name: str) -> Instance:
        for instance in self.instances:
            if instance.name == name or instance.name.split(" ", 1)[-1] == name:
                return instance
        raise BenchUsageError(f"--instance: {name!r} is not in the price table; known: "
                              f"{', '.join(i.name for i in self.instances)}")  # fmt: skip

    def matching(self, vcpus: int, gpus: int) -> Instance | None:
        """The cheapest instance with at least ``vcpus`` vCPUs and exactly ``gpus`` GPUs."""
        fits = [i for i in self.instances if i.vcpus >= vcpus and i.gpus == gpus]
        return min(fits, key=lambda i: i.hourly) if fits else None


@dataclass(frozen=True)
class Pricing:
    """The hourly price every configuration of a sweep is charged, and where it came from."""

    hourly: float
    currency: str
    label: str
    table_date: str | None
    why: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def warning(self, today: datetime.date | None = None) -> str | None:
        """Why the price may be wrong: it comes from a table dated over ``STALE_AFTER_DAYS`` ago."""
        if self.table_date is None:
            return None
        try:
            taken = datetime.date.fromisoformat(self.table_date)
        except ValueError:
            return f"the price table's date {self.table_date!r} is not a date (YYYY-MM-DD): check its prices"
        days = ((today or datetime.date.today()) - taken).days
        if days <= STALE_AFTER_DAYS:
            return None
        return (f"the prices were taken on {self.table_date}, {days / 365.25:.1f} years ago: check them, "
                "and pass --prices FILE (a copy of the table, edited) or --price-per-hour")


def local_gpus() -> int:
    """GPUs on this machine, asked of the driver's tool (bench never imports torch)."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return 0
    try:
        out = subprocess.run([tool, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


def choose_pricing(table: PriceTable, instance: str | None, price_per_hour: float | None) -> Pricing:
    if price_per_hour is not None:
        if price_per_hour <= 0:
            raise BenchUsageError(f"--price-per-hour must be > 0, got {price_per_hour}")
        return Pricing(price_per_hour, table.currency, "this machine", None, "--price-per-hour")
    if instance is not None:
        chosen = table.find(instance)
        return Pricing(chosen.hourly, table.currency, chosen.name, table.date, "--instance")
    cpus, gpus = os.cpu_count() or 1, local_gpus()
    chosen_or_none = table.matching(cpus, gpus)
    if chosen_or_none is None:
        raise BenchUsageError(f"no instance in the price table has {cpus} vCPUs and {gpus} GPUs: "
                              "pass --instance NAME or --price-per-hour USD")  # fmt: skip
    return Pricing(chosen_or_none.hourly, table.currency, chosen_or_none.name, table.date,
                   f"the cheapest entry with this machine's {cpus} vCPUs and {gpus} GPUs")  # fmt: skip


def costs(hourly: float, requests_per_s: float, output_tokens_per_s: float) -> dict[str, float | None]:
    """Cost per hour, per 1,000 requests and per million output tokens at a sustained load."""
    return {
        "per_hour": hourly,
        "per_1k_requests": hourly / (requests_per_s * 3600) * 1e3 if requests_per_s > 0 else None,
        "per_million_output_tokens": hourly / (output_tokens_per_s * 3600) * 1e6 if output_tokens_per_s > 0 else None,
    }
