"""What a run tells its user: the progress bar (or per-rank lines under a launcher) and the closing summary."""
from __future__ import annotations

from typing import Callable

from tqdm import tqdm

from cxrgen.files import resume_command
from cxrgen.runs.workers import Rank

Log = Callable[[str], None]
DEMO_WARNING = ("DEMO MODEL: random weights, so every image of this run is noise, not a chest X-ray; it checks the "
                "install, the GPU, a launch or the gallery. `cxrgen download` fetches the real model.")


def prefix(rank: Rank | None) -> str:
    """How this process's lines start: `cxrgen: `, or which rank or shard of a launch it is."""
    if rank is None:
        return "cxrgen: "
    if rank.shard is None:
        return f"[rank {rank.rank}/{rank.world_size}] "
    within = f", rank {rank.rank // rank.shard[1]}/{rank.world_size // rank.shard[1]}" \
        if rank.world_size > rank.shard[1] else ""
    return f"[shard {rank.shard[0]}/{rank.shard[1]}{within}] "


class Progress:
    """One tqdm bar on a single node; plain prefixed log lines per batch under a launcher."""

    def __init__(self, total: int, initial: int, quiet: bool, rank: Rank | None, log: Log):
        self.total, self.count, self.quiet, self.rank, self.log = total, initial, quiet, rank, log
        self.prefix = prefix(rank)
        self.bar = None if (quiet or rank) else tqdm(total=total, initial=initial, unit="img", desc="cxrgen",
                                                     dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.rank is not None and not self.quiet:
            self.log(f"{self.prefix}{self.count}/{self.total} image(s) of this rank's share")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()  # leaves the bar's last state and ends its line
            self.bar = None


def summary(rank, results: list, written: int, seconds: float, out, plan: list, metadata, remaining: int,
            share_remaining: int, log: Log) -> None:
    """The lines a run ends with: per worker, the whole, and what is left for whom."""
    for r in results if len(results) > 1 or rank else []:
        rate = r.images / r.seconds if r.seconds > 0 else 0.0
        log(f"{prefix(rank)}worker {r.name}: {r.images} image(s) in {r.seconds:.1f} s ({rate:.2f} images/s)")
    rate = written / seconds if seconds > 0 else 0.0
    log(f"{prefix(rank)}wrote {written} image(s) in {seconds:.1f} s ({rate:.2f} images/s); {len(plan)} planned. "
        f"Images: {out.where('images')}" + (f"  Metadata: {metadata}" if metadata else ""))
    if metadata is not None:
        return
    if rank is not None and rank.shard is not None and share_remaining == 0:
        log(f"{prefix(rank)}shard {rank.shard[0]} of {rank.shard[1]} is complete; {remaining} of {len(plan)} "
            "image(s) remain for the other shards (the last one to finish writes metadata.parquet)")
    else:
        log(f"{prefix(rank)}this rank's share is done, but {remaining} of {len(plan)} image(s) remain and no other "
            f"rank is making them (they stopped or never started): finish with `{resume_command(out)}`")
