"""`icd cache verify`: is the cache whole and intact? Every problem names the object at fault.

Built on cache_format.integrity: the manifest a finished dump wrote (root attributes, array shapes,
object sizes, committed samples, records and teacher-weight digests) plus every committed chunk read in
parallel (dask) through CacheReader, so it checks exactly what a training run relies on. A cache without
a manifest is not proven whole (an unfinished dump, or one written before format 1.1): that is a failure
unless `--no-manifest` asks to check only the committed samples.
"""

from __future__ import annotations

from dataclasses import dataclass

from cache_format.integrity import Damage, IntegrityReport, check_cache


@dataclass
class VerifyReport:
    integrity: IntegrityReport
    require_manifest: bool = True

    @property
    def url(self) -> str:
        return self.integrity.url

    @property
    def problems(self) -> list[Damage]:
        """Every damaged object, grouped: one entry per object key."""
        merged: dict[str, Damage] = {}
        for d in self.integrity.damage:
            merged.setdefault(d.key, d)
        return list(merged.values())

    @property
    def unfinished(self) -> str | None:
        """Why the cache is not proven whole, or None."""
        r = self.integrity
        if r.finished or any(d.kind == "manifest" for d in r.damage):
            return None
        done = f"{int(r.committed.sum())}/{r.num_samples} samples committed"
        if r.pre_manifest:
            return (
                f"written before manifests (format {r.format_version}, {done}): verify with --no-manifest to "
                "check its committed samples, or re-run `icd dump ... --resume` to finish it (which writes one)"
            )
        return (
            f"the dump did not finish ({done}): re-run `icd dump ... --resume` to finish it, or verify with "
            "--no-manifest to check only the committed samples"
        )

    @property
    def ok(self) -> bool:
        return not self.problems and not (self.require_manifest and self.unfinished)

    def summary(self) -> str:
        r = self.integrity
        status = "finished (manifest checked)" if r.finished else "no manifest"
        problems = self.problems
        count = len(problems) + (1 if self.require_manifest and self.unfinished else 0)
        # Damaged metadata stops the check before the records are read: no committed count to show.
        done = (
            f"{r.num_samples} sample slots (records not read: damaged metadata)"
            if r.of_kind("metadata")
            else f"{int(r.committed.sum())}/{r.num_samples} samples committed"
        )
        lines = [
            f"{r.url}: format {r.format_version}, {done}, "
            f"{status}, {r.checked_levels} sample-levels read, teacher weights {r.weights}: "
            f"{count} problem(s)"
        ]
        if self.unfinished and self.require_manifest:
            lines.append(f"  UNFINISHED manifest/zarr.json missing: {self.unfinished}")
        elif self.unfinished:
            lines.append(
                "  note: no manifest (--no-manifest): only the committed samples were checked, not that "
                "the cache is whole"
            )
        lines += [f"  BAD {d.key}: {d.message}" for d in problems]
        if problems:
            fixable = all(d.kind in ("shard", "teacher_weights", "manifest") for d in problems)
            lines.append(
                "  fix: "
                + (
                    "`icd dump --config-file CFG --cache PATH --resume --repair` rewrites the "
                    "damaged shards (and teacher weights) and writes a new manifest"
                    if fixable
                    else "restore the named metadata file(s) from a copy of the cache, or re-create it"
                )
            )
        return "\n".join(lines)


def verify_cache(url: str, workers: int | None = None, require_manifest: bool = True) -> VerifyReport:
    """Check the whole cache at `url` (never raises for damage: it reports it)."""
    return VerifyReport(check_cache(url, deep=True, workers=workers), require_manifest)
