"""Parquet datasets (FastVideo T2V schema or text-only) and a resumable, rank-sharded global-batch loader.

Order: every epoch is a permutation of all rows seeded by (seed, epoch). Micro-step m takes the m-th slice of
`micro_batch * world_size` rows; rank r gets its own `micro_batch` of them. The position is just m, so a resumed
run continues with exactly the rows the uninterrupted run would have seen, and one rank with batch 2B sees the
same rows as two ranks with batch B.
"""
from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
import torch

from ds_distill.errors import DataError
from ds_distill.utils.dataset_schema import LATENT_COLUMNS, TEXT_COLUMNS, tensor_from_bytes
from ds_distill.utils.rng import generator


def parquet_files(path: str | Path) -> list[Path]:
    """All parquet files of a dataset path (a file, or a directory searched recursively), sorted."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise DataError(f"{p}: training.data_path does not exist (expected a parquet file or a folder of them)")
    files = sorted(f for f in p.rglob("*.parquet") if f.is_file())
    if not files:
        raise DataError(f"{p}: training.data_path holds no .parquet files")
    return files


@dataclass
class _FileInfo:
    path: Path
    rows: int
    group_starts: list[int]


def data_sources(path: str | Path | list | dict) -> list[tuple[Path, int]]:
    """`training.data_path` as (path, repeat count) pairs: a path, or each path of a list, counts once."""
    if isinstance(path, dict):
        return [(Path(p), int(n)) for p, n in path.items()]
    if isinstance(path, (list, tuple)):
        return [(Path(p), 1) for p in path]
    return [(Path(path), 1)]


@dataclass
class _Segment:
    """One data source in index space: `rows` physical rows from `physical_start` on, each `repeat` times."""

    source: int
    start: int
    rows: int
    repeat: int
    physical_start: int


class ParquetDataset(torch.utils.data.Dataset):
    """Rows of one or many parquet files; returns raw latents (if wanted) and padded text embeddings.

    `path` may be a mapping {path: repeat_count} that mixes datasets: a source of R rows repeated n times holds
    R*n indices (row i at i, R+i, 2R+i, ...), so an epoch -- a permutation of all indices -- draws from each source
    in proportion to rows x repeat count."""

    def __init__(self, path: str | Path | list | dict, text_len: int, need_latents: bool, cache_row_groups: int = 2):
        self.text_len = text_len
        self.need_latents = need_latents
        self.files: list[_FileInfo] = []
        self._starts: list[int] = []
        """Index of each file's first row (in its source's first repeat)."""
        self._physical: list[int] = []
        self.segments: list[_Segment] = []
        needed = list(TEXT_COLUMNS) + (list(LATENT_COLUMNS) if need_latents else [])
        total = physical = 0
        for number, (source, repeat) in enumerate(data_sources(path)):
            segment = _Segment(source=number, start=total, rows=0, repeat=repeat, physical_start=physical)
            for info in self._read_files(source, needed):
                self.files.append(info)
                self._starts.append(total + segment.rows)
                self._physical.append(physical)
                segment.rows += info.rows
                physical += info.rows
            if segment.rows:
                self.segments.append(segment)
                total += segment.rows * repeat
        if total == 0:
            raise DataError(f"{path}: the dataset has no rows")
        self._segment_starts = [seg.start for seg in self.segments]
        self.num_rows = total
        self.columns = needed + ["caption"]
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = cache_row_groups

    @staticmethod
    def _read_files(path: Path, needed: list[str]) -> list[_FileInfo]:
        """The non-empty parquet files of one source, with the columns a run needs checked."""
        infos = []
        for f in parquet_files(path):
            try:
                meta = pq.ParquetFile(f)
            except Exception as exc:
                raise DataError(f"{f}: not a readable parquet file ({type(exc).__name__}: {exc})") from None
            names = set(meta.schema_arrow.names)
            missing = [c for c in needed if c not in names]
            if missing:
                hint = (
                    " (latents are needed by finetuning and rollout_mode: data; text-only data suits "
                    "rollout_mode: simulate)"
                    if any(c in LATENT_COLUMNS for c in missing)
                    else ""
                )
                raise DataError(f"{f}: column {missing[0]!r} is missing{hint}")
            starts, acc = [], 0
            for g in range(meta.num_row_groups):
                starts.append(acc)
                acc += meta.metadata.row_group(g).num_rows
            if acc:
                infos.append(_FileInfo(f, acc, starts))
        return infos

    def __len__(self) -> int:
        return self.num_rows

    def _row_group(self, fi: int, g: int):
        key = (fi, g)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        info = self.files[fi]
        pf = pq.ParquetFile(info.path)
        cols = [c for c in self.columns if c in pf.schema_arrow.names]
        table = pf.read_row_group(g, columns=cols).to_pydict()
        self._cache[key] = table
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return table

    def _file_row(self, index: int) -> tuple[int, int]:
        """(file number, row within that file) of an index (repeats of a source map to the same rows)."""
        seg = self.segments[bisect.bisect_right(self._segment_starts, index) - 1]
        physical = seg.physical_start + (index - seg.start) % seg.rows
        fi = bisect.bisect_right(self._physical, physical) - 1
        return fi, physical - self._physical[fi]

    def locate(self, index: int) -> tuple[Path, int]:
        """The file of a global row index and the row number within that file (what error messages name)."""
        fi, local = self._file_row(index)
        return self.files[fi].path, local

    def row(self, index: int) -> tuple[dict, Path, int]:
        """The raw columns of one row, its file, and its row number within that file."""
        fi, local = self._file_row(index)
        info = self.files[fi]
        g = bisect.bisect_right(info.group_starts, local) - 1
        table = self._row_group(fi, g)
        off = local - info.group_starts[g]
        return {k: v[off] for k, v in table.items()}, info.path, local

    def __getitem__(self, index: int) -> dict:
        row, path, local = self.row(index)
        out = {"index": index, "caption": row.get("caption") or ""}
        try:
            text = tensor_from_bytes(
                row["text_embedding_bytes"], row["text_embedding_shape"], row["text_embedding_dtype"]
            ).float()
            if self.need_latents:
                out["vae_latent"] = tensor_from_bytes(
                    row["vae_latent_bytes"], row["vae_latent_shape"], row["vae_latent_dtype"]
                ).float()
        except (ValueError, TypeError) as exc:
            raise DataError(f"{path}: row {local}: {exc}") from None
        if text.dim() != 2:
            raise DataError(f"{path}: row {local}: text_embedding_shape must be [L, D], got {list(text.shape)}")
        for name, value in (("text_embedding", text), ("vae_latent", out.get("vae_latent"))):
            if value is not None and not bool(torch.isfinite(value).all()):
                raise DataError(f"{path}: row {local}: {name} holds NaN or infinite values (a data problem, not "
                                f"a learning-rate one); re-encode or drop this row")
        length = min(text.shape[0], self.text_len)
        padded = torch.zeros(self.text_len, text.shape[1])
        padded[:length] = text[:length]
        mask = torch.zeros(self.text_len, dtype=torch.bool)
        mask[:length] = True
        out["text_embedding"] = padded
        out["text_mask"] = mask
        return out


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's row indices for micro-steps start, start+1, ... (forever, epoch after epoch)."""

    def __init__(self, num_rows: int, micro_batch: int, rank: int, world_size: int, seed: int, start: int = 0):
        self.global_batch = micro_batch * world_size
        if num_rows < self.global_batch:
            raise DataError(
                f"the dataset has {num_rows} rows, fewer than one global micro-batch "
                f"({micro_batch} per rank x {world_size} ranks); lower training.train_batch_size"
            )
        self.num_rows, self.micro, self.rank, self.seed, self.start = num_rows, micro_batch, rank, seed, start
        self.steps_per_epoch = num_rows // self.global_batch

    def indices_at(self, micro_step: int) -> list[int]:
        """This rank's rows at a micro-step; also the global sample ids are derived from it."""
        epoch, pos = divmod(micro_step, self.steps_per_epoch)
        perm = torch.randperm(self.num_rows, generator=generator(self.seed, 0xDA7A, epoch))
        lo = pos * self.global_batch + self.rank * self.micro
        return perm[lo : lo + self.micro].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        m = self.start
        while True:
            yield self.indices_at(m)
            m += 1

    def __len__(self) -> int:  # pragma: no cover - an infinite sampler; DataLoader asks only for iter
        return 2**62


def collate(rows: list[dict]) -> dict:
    """Stack rows; latents of different shapes in one batch are an error naming the ids."""
    out = {
        "index": torch.tensor([r["index"] for r in rows], dtype=torch.long),
        "caption": [r["caption"] for r in rows],
        "text_embedding": torch.stack([r["text_embedding"] for r in rows]),
        "text_mask": torch.stack([r["text_mask"] for r in rows]),
    }
    if "vae_latent" in rows[0]:
        shapes = {tuple(r["vae_latent"].shape) for r in rows}
        if len(shapes) > 1:
            raise DataError(f"rows {[r['index'] for r in rows]} have latents of different shapes {sorted(shapes)}")
        out["vae_latent"] = torch.stack([r["vae_latent"] for r in rows])
    return out


def _worker_ignores_stop_signals(worker_id: int) -> None:
    """SIGTERM/SIGINT are the training process's to handle (finish the step, save); a worker killed by them
    would abort that step. Workers still end with the run: it shuts them down, and they exit if it dies."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TrainLoader:
    """Iterates micro-batches for this rank from a micro-step on; attaches global sample ids. `rank` and
    `world_size` are data-parallel: with sequence parallelism, the SP group's index and the number of groups (the
    ranks of one group get the same rows and sample ids)."""

    def __init__(self, dataset: ParquetDataset, micro_batch: int, rank: int, world_size: int, seed: int,
                 num_workers: int = 0, start_micro_step: int = 0):
        self.dataset = dataset
        self.micro, self.rank, self.world = micro_batch, rank, world_size
        self.sampler = GlobalBatchSampler(len(dataset), micro_batch, rank, world_size, seed, start_micro_step)
        self.micro_step = start_micro_step
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=collate,
            persistent_workers=num_workers > 0,
            prefetch_factor=2 if num_workers > 0 else None,
            worker_init_fn=_worker_ignores_stop_signals if num_workers > 0 else None,
            # Its own generator: making the iterator must not draw from the global RNG, which a resumed run
            # restores from the checkpoint (a draw there would shift everything after it).
            generator=generator(seed, 0x10AD, start_micro_step),
        )
        self._it = iter(self.loader)

    def __iter__(self):
        return self

    def close(self) -> None:
        """End the worker processes now (also on a preempted or failed run)."""
        shutdown = getattr(self._it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __next__(self) -> dict:
        try:
            batch = next(self._it)
        except DataError as exc:
            # A worker's DataError arrives wrapped in its traceback text; keep the one line it was raised with.
            text = str(exc)
            raise DataError(text.rsplit("DataError: ", 1)[-1].strip() if "Traceback" in text else text) from None
        base = self.micro_step * self.micro * self.world + self.rank * self.micro
        batch["sample_ids"] = torch.arange(base, base + self.micro, dtype=torch.long)
        batch["micro_step"] = self.micro_step
        self.micro_step += 1
        return batch
