"""`ds-distill preprocess`: videos + a captions JSON -> the parquet training schema (DESIGN §5), resumably.

    python tools/preprocess.py --model MODEL_DIR --videos VIDEO_DIR --captions captions.json --output OUT_DIR

What a row holds, and the choices behind it:
- Frames: the clip starts at the video's first frame and takes `--num-frames` frames spaced 1/`--fps` s apart;
  frame i is the source frame nearest in time (index round(i * source_fps / fps), so a source slower than
  `--fps` repeats frames). A video too short for the whole clip is skipped with a warning and counted, never
  padded or looped: a padded clip would teach the model frozen endings. Frames are resized so the clip covers
  `--height` x `--width`, center-cropped, scaled to [-1, 1] and encoded as one [1, 3, T, H, W] video.
- Latent: the mean of the VAE posterior (`vae.encode(x).latent_dist.mode()`), in raw VAE space. The mean is
  deterministic, so a rerun reproduces a row bit for bit; training normalises with latents_mean/std itself.
- Text: the family's PromptEncoder output [seq_len, D] (as WanPipeline encodes it, padding stripped).
- `id` is the video's path as written in the captions file (a repeated path gets `#2`, `#3`, ...), `file_name`
  the same path; width/height/num_frames/fps/duration_sec describe the encoded clip, not the source file.

Resuming: rows go to `part-XXXXX.parquet` files of `--rows-per-file` rows, each written to a temporary file and
renamed into place, so a part file on disk is always complete. A rerun reads the `id` column of the part files,
skips those videos and numbers new files after the last one; a crash loses at most the rows not yet in a file.
`_preprocess.json` beside them records the settings.

Which output folder a run may write to (checked before anything is written):
- a new or empty folder: written from the start;
- this job's own output, finished or not: continued (a finished one gets nothing new). It is this job's when it
  holds only what preprocess writes (part files, `_preprocess.json`, the lock), was made with the same shaping
  settings, and every row in it is a video of this captions file with the same caption;
- anything else (another job's rows, other settings, files preprocess did not write, a dataset from elsewhere) is
  refused unless `--overwrite`, which moves the old folder aside to `OUT.replaced-<time>` (never deletes it) and
  starts afresh.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path, PurePosixPath

from ds_distill.cli import ArgumentParser, check_output_dir, loading, read_json_object, require_components
from ds_distill.errors import DataError, UserError, exit_on_user_error

# "." and "_" prefixes: pyarrow and Spark skip these when reading the folder as one dataset.
MANIFEST = "_preprocess.json"
LOCK_FILE = ".preprocess.lock"
PART_RE = re.compile(r"^part-(\d{5,})\.parquet$")
SLEEP_ENV = "DS_DISTILL_PREPROCESS_SLEEP_AFTER_FILE"
# Small row groups keep the training loader's row-group cache small: real Wan rows are ~10 MB each.
ROW_GROUP_ROWS = 8
# Settings that change what a row holds; a resumed run must match them.
SHAPING_SETTINGS = ("height", "width", "num_frames", "fps", "text_len", "latent_dtype", "text_dtype")


@dataclass
class VideoEntry:
    """One captions-file entry: where the video is, its stable id, and its caption."""

    id: str
    file_name: str
    path: Path
    caption: str


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="ds-distill preprocess", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Diffusers Wan directory (vae/, text_encoder/, tokenizer/)")
    p.add_argument("--videos", required=True, help="folder the captions' video paths are relative to")
    p.add_argument("--captions", required=True, help="JSON list of {path|file_name|video, caption|cap}")
    p.add_argument("--output", required=True, help="output folder of part-XXXXX.parquet files")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--num-frames", type=int, default=81, help="frames per clip; 4k+1 for the Wan VAE")
    p.add_argument("--fps", type=float, default=16.0, help="frame rate the clip is sampled at")
    p.add_argument("--batch-size", type=int, default=1, help="videos per VAE call")
    p.add_argument("--rows-per-file", type=int, default=32)
    p.add_argument("--text-len", type=int, default=512, help="tokenizer max length (Wan: 512)")
    p.add_argument("--latent-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--text-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh on an output folder that is not this job's (the old one is moved aside)")
    return p


def check_args(args) -> None:
    """Everything about the arguments alone, before any file is read."""
    if args.num_frames < 1:
        raise UserError(f"--num-frames {args.num_frames}: must be at least 1")
    for name in ("height", "width", "batch_size", "rows_per_file", "text_len"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if not 0 < args.fps < math.inf:
        raise UserError(f"--fps {args.fps}: must be a positive number")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        raise UserError(f"--device {args.device!r}: expected cpu, cuda or cuda:N")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: CUDA is not available on this machine")


def check_model_dir(model: str) -> Path:
    """The model folder must hold the VAE, text encoder and tokenizer."""
    path = Path(os.path.expanduser(model))
    if not path.is_dir():
        raise UserError(f"--model {model}: model directory does not exist")
    require_components(path, "--model", ("vae", "text_encoder", "tokenizer"))
    return path


def check_sizes(args, model_dir: Path) -> None:
    """Clip sizes the VAE and the transformer's patches divide (Wan: 4k+1 frames, multiples of 8 x 2 = 16 px)."""
    vae = require_components(model_dir, "--model", ("vae",))["vae"]
    transformer = model_dir / "transformer" / "config.json"
    patch = read_json_object(transformer, "--model").get("patch_size") if transformer.is_file() else None
    _, ph, pw = patch or (1, 2, 2)
    temporal, spatial = int(vae.get("scale_factor_temporal", 4)), int(vae.get("scale_factor_spatial", 8))
    if (args.num_frames - 1) % temporal:
        lo = max(1, (args.num_frames - 1) // temporal * temporal + 1)
        raise UserError(f"--num-frames {args.num_frames}: the Wan VAE needs {temporal}k+1 frames "
                        f"(e.g. {lo} or {lo + temporal})")
    for name, p in (("height", ph), ("width", pw)):
        value = getattr(args, name)
        if value % (spatial * p):
            raise UserError(f"--{name} {value}: must be a positive multiple of {spatial * p} "
                            f"({spatial}x VAE, {p}x patches)")


def _first_caption(value):
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, str) else None


def read_captions(captions: str | Path, videos: str | Path) -> list[VideoEntry]:
    """Parse a captions JSON (ours, or FastVideo's videos2caption.json) and check every video exists."""
    captions, videos = Path(captions), Path(videos)
    if not videos.is_dir():
        raise DataError(f"--videos {videos}: folder does not exist")
    try:
        data = json.loads(captions.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{captions}: captions file not found") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{captions}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{captions}: cannot read the captions file ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{captions}: expected a JSON list of {{\"path\": ..., \"caption\": ...}} entries")
    if not data:
        raise DataError(f"{captions}: the captions list is empty")

    entries, seen, missing = [], {}, []
    for i, item in enumerate(data):
        where = f"{captions}: entry {i}"
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected an object with a video path and a caption, got {type(item).__name__}")
        rel = next((item[k] for k in ("path", "file_name", "video") if isinstance(item.get(k), str)), None)
        if not rel:
            raise DataError(f"{where}: no video path (expected a 'path', 'file_name' or 'video' string)")
        key = "caption" if "caption" in item else "cap"
        caption = _first_caption(item.get(key))
        if caption is None:
            raise DataError(f"{where} ({rel}): no caption (expected 'caption' or 'cap': a string or list of strings)")
        name = str(PurePosixPath(rel.replace("\\", "/")))
        full = Path(rel) if Path(rel).is_absolute() else videos / rel
        if not full.is_file():
            missing.append((i, full))
        seen[name] = seen.get(name, 0) + 1
        vid = name if seen[name] == 1 else f"{name}#{seen[name]}"
        entries.append(VideoEntry(vid, name, full, caption))
    if missing:
        (i, full), more = missing[0], len(missing) - 1
        extra = f" ({more} more entries name missing videos)" if more else ""
        raise DataError(f"{captions}: entry {i}: video {full} not found{extra}")
    return entries


def sample_indices(num_frames: int, source_fps: Fraction, fps: float) -> list[int]:
    """Source frame index nearest to each target time i / fps, i < num_frames."""
    step = source_fps / Fraction(fps)
    return [math.floor(i * step + Fraction(1, 2)) for i in range(num_frames)]


def resize_center_crop(frames, height: int, width: int):
    """uint8 frames [T, h, w, 3] -> float [3, T, height, width] in [-1, 1] (cover, then center crop)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # T, 3, h, w
    h, w = x.shape[-2:]
    if (h, w) != (height, width):
        scale = max(height / h, width / w)
        size = (max(height, round(h * scale)), max(width, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True).clamp_(0, 255)
        top, left = (size[0] - height) // 2, (size[1] - width) // 2
        x = x[:, :, top : top + height, left : left + width]
    return (x / 127.5 - 1.0).permute(1, 0, 2, 3).contiguous()


def read_clip(path: Path, num_frames: int, fps: float, height: int, width: int):
    """(clip [3, T, H, W] in [-1, 1] or None when the video is too short, frames decoded, frames needed, fps)."""
    import av
    import numpy as np

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate
            source_fps = Fraction(rate) if rate else Fraction(fps)
            wanted = sample_indices(num_frames, source_fps, fps)
            last, keep, picked, decoded = wanted[-1], set(wanted), {}, 0
            for frame in container.decode(stream):
                if decoded in keep:
                    picked[decoded] = frame.to_ndarray(format="rgb24")
                decoded += 1
                if decoded > last:
                    break
    except DataError:
        raise
    except Exception as exc:  # PyAV raises many types (InvalidDataError, OSError, ...); all mean unreadable
        reason = getattr(exc, "strerror", None) or str(exc)  # PyAV's str() repeats the path
        raise DataError(f"{path}: unreadable video ({type(exc).__name__}: {reason})") from None
    if decoded <= last:
        return None, decoded, last + 1, float(source_fps)
    frames = np.stack([picked[i] for i in wanted])
    return resize_center_crop(frames, height, width), decoded, last + 1, float(source_fps)


def _is_ours(name: str) -> bool:
    """A file preprocess itself writes into its output folder."""
    return bool(PART_RE.match(name)) or name in (MANIFEST, LOCK_FILE, f"{MANIFEST}.tmp") or (
        name.startswith(".part-") and name.endswith(".tmp"))


def scan_parts(out: Path) -> tuple[dict[str, int], dict[str, str], int]:
    """Part files of an output folder: rows per file, caption per id, and the next file number."""
    import pyarrow.parquet as pq

    files: dict[str, int] = {}
    captions: dict[str, str] = {}
    next_index = 0
    for f in sorted(out.iterdir()):
        m = PART_RE.match(f.name)
        if not m:
            continue
        try:
            table = pq.read_table(f, columns=["id", "caption"])
        except Exception as exc:
            raise DataError(f"{f}: not a readable part file ({type(exc).__name__}); remove it and rerun") from None
        ids = table.column("id").to_pylist()
        files[f.name] = len(ids)
        captions.update(zip(ids, table.column("caption").to_pylist()))
        next_index = max(next_index, int(m.group(1)) + 1)
    return files, captions, next_index


def _read_manifest(out: Path) -> dict:
    try:
        data = json.loads((out / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data.get("settings", {}) if isinstance(data, dict) and isinstance(data.get("settings"), dict) else {}


def check_output(out: Path, entries: list[VideoEntry], settings: dict, overwrite: bool) -> bool:
    """Whether `out` may be written (see the module docstring): True when it must first be moved aside."""
    check_output_dir(out, "--output", overwrite=True)  # a file, or a place we cannot write
    if not out.is_dir() or not any(out.iterdir()):
        return False
    again = "pass --overwrite to move it aside and start afresh, or pick a new output folder"
    foreign = sorted(p.name for p in out.iterdir() if not _is_ours(p.name))
    if foreign:
        if overwrite:
            return True
        raise UserError(f"--output {out}: holds files preprocess did not write (e.g. {foreign[0]}); {again}")
    files, done, _ = scan_parts(out)
    if not files:
        return overwrite  # only settings and a lock: nothing encoded yet, so nothing to keep
    old = _read_manifest(out)
    for key in SHAPING_SETTINGS:
        if key in old and old[key] != settings[key]:
            if overwrite:
                return True
            flag = "--" + key.replace("_", "-")
            raise UserError(f"--output {out}: it holds rows made with {flag} {old[key]}, not {settings[key]}; rerun "
                            f"with the same settings, or {again}")
    wanted = {e.id: e.caption for e in entries}
    other = next((i for i in sorted(done) if i not in wanted), None)
    changed = next((i for i in sorted(done) if i in wanted and wanted[i] != done[i]), None)
    if overwrite:
        return True
    if other is not None:
        raise UserError(f"--output {out}: holds rows of videos not in this captions file (e.g. {other!r}), so it is "
                        f"another job's output; {again}")
    if changed is not None:
        raise UserError(f"--output {out}: its row for {changed!r} has another caption than this captions file; "
                        f"{again}")
    return False


def move_aside(out: Path) -> Path:
    """Rename an output folder out of the way (never delete it); refuses while another preprocess holds it."""
    import fcntl

    lock = out / LOCK_FILE
    if lock.exists():
        with open(lock) as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise UserError(f"--output {out}: another preprocess is writing to this folder") from None
    aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        n += 1
        aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    os.rename(out, aside)
    print(f"preprocess: --overwrite: moved the old {out} aside to {aside}", file=sys.stderr)
    return aside


class PartWriter:
    """Owns the output folder: lock, ids already written, atomic part files, the manifest."""

    def __init__(self, out: Path, settings: dict):
        self.out = out
        try:
            out.mkdir(parents=True, exist_ok=True)
            self._lock = open(out / LOCK_FILE, "a")
        except OSError as exc:
            raise UserError(f"--output {out}: cannot write there ({exc.strerror})") from None
        import fcntl

        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"--output {out}: another preprocess is writing to this folder") from None
        # Leftovers of a run killed mid-write: incomplete, and hidden from readers of the folder meanwhile.
        for tmp in [*out.glob(".part-*.tmp"), out / f"{MANIFEST}.tmp"]:
            if tmp.exists():
                tmp.unlink()
        self.files, captions, self.next_index = scan_parts(out)
        self.done: set[str] = set(captions)
        self.settings = settings
        if self.files:
            old = _read_manifest(out)
            if old.get("model") not in (None, settings["model"]):
                print(f"warning: {out} holds rows encoded with --model {old['model']}; continuing with "
                      f"{settings['model']} (its VAE and text encoder must be the same)", file=sys.stderr)
        else:
            self._write_manifest()  # settings are on disk before any part file, so every resume can check them

    def write(self, rows: list[dict]) -> str:
        """Write rows as the next part file, atomically; returns its name."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from ds_distill.utils.dataset_schema import T2V_SCHEMA

        name = f"part-{self.next_index:05d}.parquet"
        final, tmp = self.out / name, self.out / f".{name}.tmp"
        table = pa.Table.from_pylist(rows, schema=T2V_SCHEMA)
        try:
            with open(tmp, "wb") as fh:
                pq.write_table(table, fh, row_group_size=ROW_GROUP_ROWS)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.next_index += 1
        self.files[name] = len(rows)
        self.done.update(r["id"] for r in rows)
        self._write_manifest()
        return name

    def _write_manifest(self) -> None:
        data = {"settings": self.settings, "rows": sum(self.files.values()), "files": self.files}
        tmp = self.out / f"{MANIFEST}.tmp"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, self.out / MANIFEST)

    def close(self) -> None:
        self._lock.close()


def _prefetch(fn, items, depth: int):
    """fn(item) for each item in order, computed up to `depth` items ahead in a background thread."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        queue: deque = deque()
        it = iter(items)
        for item in it:
            queue.append((item, pool.submit(fn, item)))
            if len(queue) > depth:
                break
        while queue:
            item, fut = queue.popleft()
            nxt = next(it, None)
            if nxt is not None:
                queue.append((nxt, pool.submit(fn, nxt)))
            yield item, fut.result()


class Encoders:
    """The family's VAE and prompt encoder on one device."""

    def __init__(self, model_dir: Path, device: str):
        import diffusers
        import torch
        import transformers
        from diffusers import AutoencoderKLWan

        from ds_distill.models.wan_common import PromptEncoder, text_encoder_dtype

        # Our own bar is the progress display; per-load bars would interleave with it.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()

        self.device = torch.device(device)
        self.vae = AutoencoderKLWan.from_pretrained(model_dir / "vae", torch_dtype=torch.float32).to(self.device)
        self.vae.eval()
        self.text = PromptEncoder(model_dir, device=self.device, dtype=text_encoder_dtype(self.device))

    def latents(self, clips: list):
        """Posterior means [B, C, T, h, w] (fp32, CPU) of clips [3, T, H, W] in [-1, 1]."""
        import torch

        with torch.no_grad():
            x = torch.stack(clips).to(self.device, torch.float32)
            return self.vae.encode(x).latent_dist.mode().float().cpu()


def make_rows(entries: list[VideoEntry], latents, texts, args) -> list[dict]:
    """Parquet rows (T2V_SCHEMA) for encoded videos."""
    from ds_distill.utils.dataset_schema import tensor_to_bytes, torch_dtype

    rows = []
    for entry, latent, text in zip(entries, latents, texts):
        latent = latent.to(torch_dtype(args.latent_dtype))
        text = text.to(torch_dtype(args.text_dtype))
        rows.append(
            {
                "id": entry.id,
                "vae_latent_bytes": tensor_to_bytes(latent),
                "vae_latent_shape": list(latent.shape),
                "vae_latent_dtype": args.latent_dtype,
                "text_embedding_bytes": tensor_to_bytes(text),
                "text_embedding_shape": list(text.shape),
                "text_embedding_dtype": args.text_dtype,
                "file_name": entry.file_name,
                "caption": entry.caption,
                "media_type": "video",
                "width": args.width,
                "height": args.height,
                "num_frames": args.num_frames,
                "duration_sec": args.num_frames / args.fps,
                "fps": float(args.fps),
            }
        )
    return rows


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    """CLI: preprocess videos + captions into resumable parquet part files."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    check_args(args)
    model_dir = check_model_dir(args.model)
    check_sizes(args, model_dir)
    entries = read_captions(args.captions, args.videos)
    out = Path(os.path.expanduser(args.output))
    settings = {k: getattr(args, k) for k in SHAPING_SETTINGS}
    settings["model"] = str(model_dir.resolve())
    move = check_output(out, entries, settings, args.overwrite)
    done = set() if move or not out.is_dir() else set(scan_parts(out)[1])
    # Loaded before anything is written, so weights that do not load leave the output folder as it was.
    enc = load_encoders(model_dir, args.device) if any(e.id not in done for e in entries) else None
    if move:
        move_aside(out)
    writer = PartWriter(out, settings)
    try:
        return _run(args, model_dir, enc, entries, writer)
    finally:
        writer.close()


def load_encoders(model_dir: Path, device: str) -> "Encoders":
    with loading("VAE or text encoder", model_dir, "--model"):
        return Encoders(model_dir, device)


def _run(args, model_dir: Path, enc: "Encoders | None", entries: list[VideoEntry], writer: PartWriter) -> int:
    from tqdm import tqdm

    pending = [e for e in entries if e.id not in writer.done]
    already = len(entries) - len(pending)
    sleep_after_file = float(os.environ.get(SLEEP_ENV, "0") or 0)
    written, files, short = 0, 0, 0
    rows: list[dict] = []
    batch: list = []

    def flush(final: bool) -> None:
        nonlocal written, files, rows
        while rows and (final or len(rows) >= args.rows_per_file):
            chunk, rows = rows[: args.rows_per_file], rows[args.rows_per_file :]
            name = writer.write(chunk)
            written += len(chunk)
            files += 1
            bar.set_postfix_str(name, refresh=False)
            if sleep_after_file > 0:  # test hook: a deterministic point to kill the process at
                time.sleep(sleep_after_file)

    def encode_batch() -> None:
        nonlocal batch
        if batch:
            batch_entries = [e for e, _ in batch]
            latents = enc.latents([c for _, c in batch])
            texts = enc.text([e.caption for e in batch_entries], args.text_len)
            rows.extend(make_rows(batch_entries, latents, texts, args))
            batch = []
            flush(final=False)

    def load(entry: VideoEntry):
        return read_clip(entry.path, args.num_frames, args.fps, args.height, args.width)

    if pending and enc is None:  # rows vanished from the folder between the checks and taking its lock
        enc = load_encoders(model_dir, args.device)
    bar = tqdm(total=len(pending), desc="preprocess", unit="video", dynamic_ncols=True,
               disable=os.environ.get("DS_DISTILL_NO_TQDM") == "1")
    try:
        for entry, (clip, available, need, source_fps) in _prefetch(load, pending, depth=2 * args.batch_size):
            if clip is None:
                short += 1
                tqdm.write(f"warning: {entry.path}: too short ({available} frames at {source_fps:g} fps; "
                           f"{args.num_frames} frames at {args.fps:g} fps need {need}); skipped", file=sys.stderr)
            else:
                batch.append((entry, clip))
                if len(batch) == args.batch_size:
                    encode_batch()
            bar.update(1)
        encode_batch()
        flush(final=True)
    except (UserError, KeyboardInterrupt):
        flush(final=True)  # keep what is already encoded: it lands in complete part files before exiting
        raise
    finally:
        bar.close()
    print(
        f"preprocess: wrote {written} rows in {files} files; {already} videos already done, {short} skipped as "
        f"too short; {len(writer.done)} rows in {writer.out}"
    )
    return 0
