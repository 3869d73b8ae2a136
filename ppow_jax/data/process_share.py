"""A cache on shared storage built by several processes at once (the hosts of a pod), each its share.

The caches built this way (self-distilled responses, target features) keep one `manifest.json`,
written by process 0 alone. While a multi-process run works, each process lists the shards it
finished in its own `manifest.process-I.json`; process 0 folds those in at the end, or when a rerun
starts after an interruption. The processes meet at fixed points (`ProcessShare.gather`, a
collective that carries an integer): an error or Ctrl-C on one is raised on all of them at the next
meeting point, instead of leaving the others waiting. An interrupt while a process waits for the
others, or a process killed outright, is noticed only by JAX's heartbeat.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import zlib
from typing import Any, Callable, Optional, TypeVar

from tqdm import tqdm

from ppow_jax.errors import InputError
from ppow_jax.files import write_atomically

PROCESS_MANIFEST = "manifest.process-{}.json"  # the shards one process of a multi-process run finished

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class ProcessShare:
    """This process's part of a job shared by `count` processes. `gather(x)` returns every process's
    integer x, in process order, once all have called it (`multihost.gather_ints`): how they wait for
    each other and check that they agree. The default is a single process."""

    index: int = 0
    count: int = 1
    gather: Callable[[int], list[int]] = lambda value: [value]

    @property
    def primary(self) -> bool:
        return self.index == 0

    def failed(self, ok: bool) -> list[int]:
        """The processes that report a failure here (every process must call this at the same point)."""
        return [process for process, flag in enumerate(self.gather(int(ok))) if not flag]

    def raise_on_failure(self, problem: Optional[BaseException], what: str) -> None:
        """Every process waits here; if any brought a problem, each raises (its own, or `what`)."""
        failed = self.failed(problem is None)
        if problem is not None:
            raise problem
        if failed:
            raise InputError(f"{what} (see the log of process {failed[0]})")

    def on_primary(self, work: Callable[[], T], what: str) -> Optional[T]:
        """`work()` on process 0 (its result there, None elsewhere); every process waits for it and
        raises if it failed. BaseException: an interrupted process 0 must still tell the others."""
        result, problem = None, None
        if self.primary:
            try:
                result = work()
            except BaseException as err:  # noqa: BLE001 (raised below, once every process knows)
                problem = err
        self.raise_on_failure(problem, what)
        return result

    def read_agreed(self, read: Callable[[], T], what: str) -> T:
        """`read()` of shared files (`what`) on every process, refused on all unless all read the same:
        storage that shows a host an old manifest would have two hosts write one shard differently."""
        problem: Optional[BaseException] = None
        try:
            value = read()
            digest = zlib.crc32(json.dumps(value, sort_keys=True).encode()) & 0x7FFFFFFF
        except BaseException as err:  # noqa: BLE001 (raised below, once every process knows)
            problem, digest = err, -1
        digests = self.gather(digest)
        if problem is not None:
            raise problem
        if -1 in digests:
            raise InputError(f"process {digests.index(-1)} could not read {what} (see its log)")
        if len(set(digests)) > 1:
            raise InputError(f"the processes read different versions of {what}: the hosts must share storage "
                             "that shows each of them the latest files")
        return value

    def progress_bar(self, *, total: int, to_do: int, mine: int, desc: str, unit: str, progress: bool) -> tqdm:
        """Alone: the whole job (`to_do` of `total` left); one of several: this process's part (`mine`),
        process 0's bar standing for all."""
        if self.count == 1:
            return tqdm(total=total, initial=total - to_do, desc=desc, unit=unit, disable=not progress)
        return tqdm(total=mine, desc=f"{desc} (process 0 of {self.count})", unit=unit,
                    disable=not (progress and self.primary))

    def finish(self, problem: Optional[BaseException], merge: Callable[[], None], cache_dir: pathlib.Path) -> None:
        """After each process has done its part (`problem`: what stopped it, if anything): process 0
        merges what every process finished, the failed ones' included; raises on every process if any
        failed or the merge did."""
        failed = self.failed(problem is None)
        merge_problem: Optional[BaseException] = None
        if self.primary:
            try:
                merge()
            except BaseException as err:  # noqa: BLE001 (raised below, once every process knows)
                merge_problem = err
        if problem is None and failed:
            problem = InputError(f"processes {failed} failed to do their part of {cache_dir} (see their logs); "
                                 "the shards every process finished are kept: rerun to go on")
        if problem is not None and merge_problem is not None:
            problem.add_note(f"and process 0 could not merge the processes' manifests: {merge_problem!r}")
        # Once more, so that the others wait for the merge and hear if it failed.
        self.raise_on_failure(problem or merge_problem, f"process 0 could not merge the processes' manifests in "
                                                        f"{cache_dir}")


@dataclasses.dataclass
class ShardListing:
    """Where a process lists each shard it finishes: `manifest.json` itself (kept in `order`, passed
    through `finish`) when it works alone; its own process manifest when it is one of several."""

    cache_dir: pathlib.Path
    share: ProcessShare
    manifest: dict  # the agreed manifest.json
    order: Callable[[dict], Any]
    finish: Callable[[dict], dict] = lambda manifest: manifest
    mine: list[dict] = dataclasses.field(default_factory=list)

    def add(self, shard: dict) -> None:
        self.mine.append(shard)
        if self.share.count == 1:
            self.manifest = self.finish({**self.manifest, "shards": sorted(self.manifest["shards"] + [shard],
                                                                            key=self.order)})
            write_manifest(self.cache_dir, self.manifest)
        else:
            _write_process_manifest(self.cache_dir, self.share, self.manifest["settings"], self.mine)

    def listed(self) -> list[dict]:
        """The shards this process can count: the whole cache's alone, its own when one of several."""
        return self.manifest["shards"] if self.share.count == 1 else self.mine


def write_manifest(cache_dir: pathlib.Path, manifest: dict, name: str = "manifest.json") -> None:
    write_atomically(cache_dir / name, json.dumps(manifest, indent=1))  # a crash leaves the old manifest


def _write_process_manifest(cache_dir: pathlib.Path, share: ProcessShare, settings: Any, shards: list[dict]) -> None:
    """This process's finished shards, each marked with the process, with the settings they were made under."""
    write_manifest(cache_dir, {"settings": settings, "shards": [{**shard, "process": share.index} for shard in shards]},
                   PROCESS_MANIFEST.format(share.index))


def unmerged_process_manifests(cache_dir: pathlib.Path) -> list[str]:
    return sorted(path.name for path in cache_dir.glob(PROCESS_MANIFEST.format("*")))


def fold_in_process_manifests(cache_dir: pathlib.Path, manifest: dict, *, order: Callable[[dict], Any],
                              finish: Callable[[dict], dict] = lambda manifest: manifest) -> None:
    """Adds the shards listed by the processes of a multi-process run to `manifest` (the cache's
    `manifest.json` as read), sorted by `order`, writes `finish(manifest)` as `manifest.json`, then
    removes the process manifests (only once the merged one is in place)."""
    paths = [cache_dir / name for name in unmerged_process_manifests(cache_dir)]
    if not paths:
        return
    shards = {shard["file"]: shard for shard in manifest["shards"]}
    for path in paths:
        try:
            listed = json.loads(path.read_text())
            settings, listed_shards = listed["settings"], listed["shards"]
        except (json.JSONDecodeError, KeyError) as err:
            raise InputError(f"{path} is corrupt ({err!r}); delete it and the shards it lists to make them "
                             "again") from None
        if settings != manifest["settings"]:
            raise InputError(f"{path} lists shards made with settings {settings}, not the cache's "
                             f"{manifest['settings']}; delete it and the shards it lists")
        shards.update({shard["file"]: shard for shard in listed_shards})
    write_manifest(cache_dir, finish({**manifest, "shards": sorted(shards.values(), key=order)}))
    for path in paths:
        path.unlink()
