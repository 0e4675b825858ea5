"""Video frames as VideoChat-Flash samples them: frame choice, decoding, and UMT preprocessing.

Three steps, each usable on its own:

* `frame_indices` picks which frames to use. It returns exactly what the reference
  `get_frame_indices` (`llava-train_videochat/llava/video_utils.py`) returns for `sample="dynamic_fps1"`
  and `sample="middle"`, padding and short-video corner cases included.
* `decode_frames` opens a file path or the file's bytes with OpenCV and returns the chosen frames as RGB
  uint8, restricted to a `start`/`end` span (seconds) the way the reference `read_frames_decord` does it.
  With `size` each kept frame is resized as it is decoded (the reference's resize, below): a 10,000-frame
  1080p video then never sits on the host at full size (62 GB), only at the vision tower's.
* `preprocess` is the reference `UMTImageProcessor`: straight resize to size x size with PIL bicubic, /255,
  ImageNet normalisation; channels last here.

Decoding takes neither a seek nor the container's frame count on trust (libraries.md §8): frames are
decoded forward and counted, so the index of a frame is its position in the decoded stream, as decord's
indices are. A span that starts late is reached with one seek, kept only while every frame's timestamp sits
where its assumed index says; otherwise the span is decoded from frame 0. A count the decode contradicts is
replaced by the decoded one and the frames chosen again. Every failure is a `VideoDecodeError` naming the video.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from typing import Any, Callable

import cv2
import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

from hico_jax.data import IMAGENET_MEAN, IMAGENET_STD, normalize  # noqa: E402  # re-exported

MODES = ("dynamic_fps1", "middle")

Source = str | os.PathLike | bytes | bytearray | memoryview

# Seek (once) only when the span starts this many frames in; shorter skips are cheaper to decode than to
# verify. The seek is checked frame by frame against the timestamp grid and abandoned if it disagrees.
_SEEK_MIN_FRAMES = 256
# A decode that ends before this fraction of the frames the container declares is a truncated file, not a
# slightly wrong count (VFR estimates are off by a few percent, a cut file by much more).
_MIN_DECODED_FRACTION = 0.75
# Where bytes go when this OpenCV cannot read from a stream: memory-backed where there is /dev/shm.
_TMP_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None
# The reference trims 0.1 s off the end of a video before cutting a span ("keep end inside the video").
_END_MARGIN_S = 0.1


class VideoDecodeError(ValueError):
    """A video could not be opened or decoded, or the span asked for holds no frames."""


# ----------------------------------------------------------------------------------------------------------
# Which frames: get_frame_indices
# ----------------------------------------------------------------------------------------------------------


def frame_indices(
    vlen: int,
    fps: float,
    *,
    mode: str = "dynamic_fps1",
    num_frames: int | None = None,
    min_frames: int = 1,
    max_frames: int = -1,
    clip_frames: int = 4,
) -> np.ndarray:
    """Indices (into a video of `vlen` frames at `fps`) that the reference samples; int64, sorted.

    `dynamic_fps1` takes about one frame a second in whole clips of `clip_frames`, between `min_frames` and
    `max_frames` (`max_frames <= 0`: no cap; a cap or floor off whole clips gives a count off them, as in the
    reference); `num_frames` is ignored there, as in the reference.
    `middle` takes `max(num_frames, min_frames)` frames, one from the middle of each equal segment. Either
    way, asking for more frames than the video has repeats its last sampled frame.
    """
    if mode not in MODES:
        raise ValueError(f"frame sampling mode must be one of {MODES}, got {mode!r}")
    vlen = int(vlen)
    if vlen < 1:
        raise ValueError(f"cannot sample frames from a video of {vlen} frames")
    if clip_frames < 1:
        raise ValueError(f"clip_frames must be >= 1, got {clip_frames}")
    dynamic = mode == "dynamic_fps1"
    if dynamic and not (fps is not None and math.isfinite(fps) and fps > 0):
        raise ValueError(f"dynamic_fps1 sampling needs a positive frame rate, got fps={fps}")
    if not dynamic and (num_frames is None or num_frames < 1):
        raise ValueError(f"middle sampling needs num_frames >= 1, got {num_frames}")

    # A video shorter than the floor lowers the floor: to whole clips for dynamic_fps1, to vlen otherwise.
    if min_frames > vlen:
        min_frames = (vlen // clip_frames) * clip_frames if dynamic else vlen

    if dynamic:
        # One frame a second, rounded down to whole clips; a video under one clip long still gets one clip.
        segments = int(float(vlen) / float(fps) // clip_frames)
        n = clip_frames * segments if segments != 0 else clip_frames
        if max_frames > 0:
            n = min(n, max_frames)
    else:
        n = int(num_frames)
    n = max(min_frames, n)

    # The middle frame of each of min(n, vlen) segments; the segment edges are float linspace truncated to
    # int, exactly as the reference computes them (its rounding decides which frame is "middle").
    segments = min(n, vlen)
    edges = np.linspace(0, vlen, segments + 1).astype(np.int64)
    idx = (edges[:-1] + (edges[1:] - 1)) // 2
    if segments < n:
        idx = np.concatenate([idx, np.full(n - segments, idx[-1], np.int64)])
    return idx


def _span(total: int, fps: float, start: float | None, end: float | None) -> tuple[int, int, float]:
    """(first frame, frames in span, span seconds) for a start/end request, by read_frames_decord's rules.

    No span: the whole video. Otherwise start is clamped to >= 0 and end to <= duration - 0.1 s, and both
    are turned into frames by truncating seconds * fps. A missing start is 0, a missing end the video's end.
    """
    if start is None and end is None:
        return 0, total, total / fps
    s = max(0.0, 0.0 if start is None else float(start))
    e = min(total / fps - _END_MARGIN_S, math.inf if end is None else float(end))
    duration = e - s
    return int(s * fps), int(duration * fps), duration


def _frames_proving_end_unclamped(end: float, fps: float) -> int:
    """Smallest frame count v for which `end <= v / fps - 0.1`, in the float arithmetic `_span` uses.

    A video with at least this many frames leaves a requested `end` unclamped, so the span (and the indices)
    do not depend on the exact frame count, and decoding can stop there.
    """
    v = max(1, math.ceil((end + _END_MARGIN_S) * fps))
    while v > 1 and end <= (v - 1) / fps - _END_MARGIN_S:
        v -= 1
    while not end <= v / fps - _END_MARGIN_S:
        v += 1
    return v


# ----------------------------------------------------------------------------------------------------------
# Opening: a path, or bytes through OpenCV's stream reader (a temporary file where OpenCV lacks one)
# ----------------------------------------------------------------------------------------------------------


def _source_name(source: Source) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<bytes len={memoryview(source).nbytes}>"
    return repr(os.fspath(source))


def _stream_reading_supported() -> bool:
    registry = getattr(cv2, "videoio_registry", None)
    backends = getattr(registry, "getStreamBufferedBackends", None)
    return backends is not None and cv2.CAP_FFMPEG in backends()


@contextlib.contextmanager
def _capture_factory(source: Source, name: str) -> Iterator[Callable[[], contextlib.AbstractContextManager]]:
    """Yields `open_capture()`, a context manager for a fresh `cv2.VideoCapture` on the source."""
    tmp_path = None
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise VideoDecodeError(f"video {name}: empty input")
        if not _stream_reading_supported():
            fd, tmp_path = tempfile.mkstemp(suffix=".mp4", prefix="hico_video_", dir=_TMP_DIR)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise VideoDecodeError(f"video {name}: no such file")
        if os.path.getsize(path) == 0:
            raise VideoDecodeError(f"video {name}: empty file")

    @contextlib.contextmanager
    def open_capture() -> Iterator[cv2.VideoCapture]:
        stream = None  # must outlive the capture: OpenCV 5 crashes on release if it held the last reference
        if tmp_path is not None:
            cap = cv2.VideoCapture(tmp_path, cv2.CAP_FFMPEG)
        elif isinstance(source, (bytes, bytearray, memoryview)):
            stream = io.BytesIO(data)
            cap = cv2.VideoCapture(stream, cv2.CAP_FFMPEG, [])
        else:
            cap = cv2.VideoCapture(os.fspath(source), cv2.CAP_FFMPEG)
        try:
            if not cap.isOpened():
                raise VideoDecodeError(f"video {name}: FFmpeg cannot open it (corrupt, truncated or not a video)")
            # decord, which the reference reads with, ignores rotation metadata; so do we.
            cap.set(cv2.CAP_PROP_ORIENTATION_AUTO, 0)
            yield cap
        finally:
            cap.release()
            del cap
            del stream

    try:
        yield open_capture
    finally:
        if tmp_path is not None:
            os.remove(tmp_path)


def _frame_count_hint(cap: cv2.VideoCapture) -> int | None:
    """The container's frame count, or None where it has none. Often exact, sometimes estimated."""
    n = cap.get(cv2.CAP_PROP_FRAME_COUNT)
    return int(n) if math.isfinite(n) and n >= 1 else None


# ----------------------------------------------------------------------------------------------------------
# Reading forward
# ----------------------------------------------------------------------------------------------------------


class _SeekMismatch(Exception):
    """Timestamps after a seek disagree with the frame positions assumed; decode from frame 0 instead."""


def _on_grid(cap: cv2.VideoCapture, index: int, fps: float) -> bool:
    """After grab(): is the frame just grabbed frame `index` by both OpenCV's position and its timestamp?"""
    pos_ok = int(round(cap.get(cv2.CAP_PROP_POS_FRAMES))) == index + 1
    msec = cap.get(cv2.CAP_PROP_POS_MSEC)
    return pos_ok and abs(msec - index * 1000.0 / fps) < 500.0 / fps


# Frames between two calls of a decode's progress callback: often enough for a bar, rare enough to cost nothing.
_PROGRESS_EVERY = 32

Progress = Callable[[int, int | None], None]


def _read_pass(
    cap: cv2.VideoCapture, name: str, wanted: np.ndarray, fps: float, stop_at: int | None, *, seek: bool,
    size: int | None = None, progress: Progress | None = None, expected: int | None = None,
) -> tuple[dict[int, np.ndarray], int | None]:
    """Decode forward keeping the `wanted` frames (RGB, resized to size x size if given), until frame
    `stop_at` or the end of the stream.

    Returns the kept frames and, where the stream ended first, the number of frames it holds. With `seek`,
    jumps once to the first wanted frame and checks every frame after it against the timestamp grid.
    `progress(frames passed, frames this pass expects to pass)` is called every few frames.
    """
    wanted_set = set(int(i) for i in wanted)
    kept: dict[int, np.ndarray] = {}
    shape = None  # of the frames as decoded: a resize would hide a size change
    index, grabbed = 0, False
    if seek:
        target = int(wanted[0])
        cap.set(cv2.CAP_PROP_POS_FRAMES, target)
        if not (cap.grab() and _on_grid(cap, target, fps)):
            raise _SeekMismatch
        log.debug("video %s: seeked to frame %d", name, target)
        index, grabbed = target, True
    while True:
        if not grabbed and not cap.grab():
            if progress is not None:
                progress(index, index)
            return kept, index
        grabbed = False
        if seek and not _on_grid(cap, index, fps):
            raise _SeekMismatch
        if index in wanted_set:
            ok, bgr = cap.retrieve()
            if not ok or bgr is None:
                raise VideoDecodeError(f"video {name}: frame {index} was grabbed but cannot be retrieved")
            if shape is not None and bgr.shape != shape:
                raise VideoDecodeError(f"video {name}: frame size changes within the video: {shape} at the "
                                       f"first sampled frame, {bgr.shape} at frame {index}")
            shape = bgr.shape
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=bgr)  # in place: one full-size frame at a time
            kept[index] = rgb if size is None else _resize_frame(rgb, size)
            del bgr, rgb
        if progress is not None and index % _PROGRESS_EVERY == 0:
            progress(index + 1, expected)
        if stop_at is not None and index >= stop_at:
            if progress is not None:
                progress(index + 1, index + 1)
            return kept, None
        index += 1


def decode_frames(
    source: Source,
    *,
    mode: str = "dynamic_fps1",
    num_frames: int | None = None,
    min_frames: int = 1,
    max_frames: int = -1,
    clip_frames: int = 4,
    start: float | None = None,
    end: float | None = None,
    size: int | None = None,
    progress: Progress | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode the frames `frame_indices` picks, from a path or an encoded video's bytes.

    Returns `frames: (T, H, W, 3)` uint8 RGB and `info` with `fps`, `vlen` (frames in the whole video: exact
    when the decode reached the end, else the container's count), `duration` (seconds of the span used) and
    `indices` (int64, into the whole video). `start`/`end` (seconds) restrict sampling to that span.

    `size`: each kept frame is resized to (size, size) as it is decoded, exactly as `resize_frames` would
    resize the full-size result, so only sampled frames at that size are ever held. `progress(passed,
    expected)` is called every few decoded frames of each pass (a video may take two passes where its
    container's frame count is missing or wrong; `expected` is None while the frames are being counted).
    """
    sample = dict(mode=mode, num_frames=num_frames, min_frames=min_frames, max_frames=max_frames,
                  clip_frames=clip_frames)
    frame_indices(1, 1.0, **sample)  # bad sampling arguments are a plain ValueError, before any decoding
    if size is not None and (isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1):
        raise ValueError(f"size must be a positive number of pixels or None, got {size!r}")
    name = _source_name(source)
    try:
        with _capture_factory(source, name) as open_capture:
            with open_capture() as cap:
                fps = cap.get(cv2.CAP_PROP_FPS)
                declared = _frame_count_hint(cap)
            if not (math.isfinite(fps) and fps > 0):
                raise VideoDecodeError(f"video {name}: no usable frame rate (FPS={fps})")
            return _decode(open_capture, name, fps, declared, sample, start, end,
                           dict(size=None if size is None else int(size), progress=progress))
    except cv2.error as e:
        raise VideoDecodeError(f"video {name}: OpenCV failed: {e}") from None


def probe(source: Source) -> dict[str, Any]:
    """Opens a video and decodes its first frame, without reading further: `fps`, `declared_frames` (the
    container's count, None if it has none), `height` and `width`. A cheap check that a file is a video before
    a long job starts; VideoDecodeError names the source otherwise."""
    name = _source_name(source)
    try:
        with _capture_factory(source, name) as open_capture, open_capture() as cap:
            fps, declared = cap.get(cv2.CAP_PROP_FPS), _frame_count_hint(cap)
            ok, bgr = cap.read()
    except cv2.error as e:
        raise VideoDecodeError(f"video {name}: OpenCV failed: {e}") from None
    if not (math.isfinite(fps) and fps > 0):
        raise VideoDecodeError(f"video {name}: no usable frame rate (FPS={fps})")
    if not ok or bgr is None:
        raise VideoDecodeError(f"video {name}: opens but its first frame does not decode")
    return dict(fps=float(fps), declared_frames=declared, height=int(bgr.shape[0]), width=int(bgr.shape[1]))


def _decode(
    open_capture: Callable[[], contextlib.AbstractContextManager],
    name: str,
    fps: float,
    declared: int | None,
    sample: dict[str, Any],
    start: float | None,
    end: float | None,
    reading: dict[str, Any],
) -> tuple[np.ndarray, dict[str, Any]]:
    total, exact = declared, False  # the count is a hint until a pass reaches the end of the stream
    for _ in range(3):
        if total is None:  # no count at all: count first
            with open_capture() as cap:
                _, total = _read_pass(cap, name, np.zeros(0, np.int64), fps, None, seek=False,
                                      progress=reading["progress"])
            exact = True
            _check_count(name, total, declared)

        first, span_vlen, duration = _span(total, fps, start, end)
        if span_vlen < 1:
            raise VideoDecodeError(
                f"video {name}: span start={start} end={end} s holds no frames "
                f"(video is {total} frames at {fps:g} fps = {total / fps:.2f} s)")
        indices = frame_indices(span_vlen, fps, **sample) + first
        wanted = np.unique(indices)

        # Decode only as far as the indices depend on. They depend on the exact frame count for a whole
        # video or a span cut by the video's end: read to the end. A span whose `end` lies inside the video
        # only needs the video to be long enough not to cut it: read just past `end`.
        if exact:
            stop_at = int(wanted[-1])
        elif end is not None and end <= total / fps - _END_MARGIN_S:
            stop_at = max(int(wanted[-1]), _frames_proving_end_unclamped(end, fps) - 1)
        else:
            stop_at = None
        expected = total if stop_at is None else stop_at + 1
        try:
            with open_capture() as cap:
                kept, eof_total = _read_pass(cap, name, wanted, fps, stop_at, expected=expected,
                                             seek=int(wanted[0]) >= _SEEK_MIN_FRAMES, **reading)
        except _SeekMismatch:
            log.debug("video %s: seek landed off the timestamp grid; decoding from frame 0", name)
            with open_capture() as cap:
                kept, eof_total = _read_pass(cap, name, wanted, fps, stop_at, seek=False, expected=expected,
                                             **reading)

        if eof_total is not None and (eof_total != total or len(kept) < len(wanted)):
            # The stream ended elsewhere than the count we planned with: plan again with the true count.
            log.debug("video %s: container declares %s frames, %d decode", name, declared, eof_total)
            _check_count(name, eof_total, declared)
            total, exact = eof_total, True
            continue
        info = dict(fps=float(fps), vlen=int(total), duration=float(duration), indices=indices)
        return _gather(kept, indices), info
    raise VideoDecodeError(f"video {name}: the number of decodable frames differs between passes")


def _gather(kept: dict[int, np.ndarray], indices: np.ndarray) -> np.ndarray:
    """kept[i] for i in indices, stacked; each kept frame is let go after its last use, so the host holds the
    sampled frames about once, not twice, while they are gathered."""
    uses = collections.Counter(int(i) for i in indices)
    first = kept[int(indices[0])]
    out = np.empty((len(indices),) + first.shape, first.dtype)
    for k, i in enumerate(indices):
        out[k] = kept[int(i)]
        uses[int(i)] -= 1
        if not uses[int(i)]:
            del kept[int(i)]
    return out


def _check_count(name: str, decoded: int, declared: int | None) -> None:
    if decoded == 0:
        raise VideoDecodeError(f"video {name}: opens but no frame decodes (container declares {declared})")
    if declared is not None and decoded < _MIN_DECODED_FRACTION * declared:
        raise VideoDecodeError(
            f"video {name}: truncated or corrupt: container declares {declared} frames, only {decoded} decode")


# ----------------------------------------------------------------------------------------------------------
# UMTImageProcessor
# ----------------------------------------------------------------------------------------------------------


def whole_clips(frames: np.ndarray, clip_frames: int = 4) -> np.ndarray:
    """`frames` (T, ...) padded with copies of the last frame to a whole number of clips.

    The model encodes a sample's frames clip by clip, and a packed row holds its samples' frames back to back:
    a sample that ended mid-clip would share its last clip with the next sample. `frame_indices` keeps the
    reference's counts, which are whole clips except where the reference could not have trained either
    (`middle` sampling of a video shorter than `min_frames`: the floor becomes its frame count). Padding with
    the last frame is what the reference does when it asks for more frames than a video has.
    """
    extra = -len(frames) % clip_frames
    if not len(frames) or not extra:
        return frames
    return np.concatenate([frames, np.repeat(frames[-1:], extra, axis=0)])


def resize_frames(frames_uint8: np.ndarray, size: int) -> np.ndarray:
    """`(T, H, W, 3)` uint8 -> `(T, size, size, 3)` uint8: the reference's straight resize (no aspect ratio
    kept, no crop) with PIL bicubic, which antialiases when it shrinks. The training pipeline ships these
    uint8 frames and normalises on the device (4x fewer bytes than float32)."""
    frames = np.asarray(frames_uint8)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames of shape (T, H, W, 3), got {frames.dtype} {frames.shape}")
    out = np.empty((frames.shape[0], size, size, 3), np.uint8)
    for t, frame in enumerate(frames):
        out[t] = _resize_frame(frame, size)
    return out


def _resize_frame(frame: np.ndarray, size: int) -> np.ndarray:
    """One (H, W, 3) uint8 frame -> (size, size, 3): the one resize both `resize_frames` and decoding use."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(frame)).resize((size, size), Image.Resampling.BICUBIC))


def preprocess(frames_uint8: np.ndarray, size: int) -> np.ndarray:
    """`frames: (T, H, W, 3)` uint8 RGB -> `(T, size, size, 3)` float32, as UMTImageProcessor makes them:
    resize_frames, then normalize."""
    return normalize(resize_frames(frames_uint8, size))
