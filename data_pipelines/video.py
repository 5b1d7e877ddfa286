"""Video op ``decode_video``: sampled, resized, patchified frames (+ audio track).

Decoding uses PyAV (FFmpeg bundled in its wheel). Frames are sampled as the
Qwen video processor (``Qwen2VLVideoProcessor.sample_frames``) samples them
with ``fps``: ``n = total_frames / video_fps * fps`` clamped to
``[min_frames, max_frames]`` and to the video's frames, floored to a multiple
of ``temporal_patch_size``; indices ``arange(0, total, total / n)`` (in
float32, truncated, as torch computes them). A video of fewer frames than
``temporal_patch_size`` keeps all its frames and repeats the last one.

The sampled frames are resized as images are (``vision.smart_resize`` with
``min_pixels``/``max_pixels``, defaults from ``Qwen3OmniMoeProcessor``: 128 and
768 merged 32x32 tokens per frame; Pillow bicubic), normalized (mean = std =
0.5) and patchified into ``pixel_values_videos (grid_t * grid_h * grid_w,
3 * 2 * 16 * 16)`` with ``video_grid_thw = [grid_t, grid_h, grid_w]``.

Time: the effective sampling rate is ``n / total_frames * video_fps`` (the
"dynamic fps" the Qwen reference ``qwen_omni_utils`` passes on as ``fps``), so
``video_second_per_grid = temporal_patch_size / effective_fps`` seconds per
temporal patch, and ``video_timestamps`` holds each sampled frame's
presentation time in seconds from the first frame (so variable-frame-rate
videos get their real times).

Audio in video: with ``audio=True`` the first audio stream is decoded,
resampled to 16 kHz mono (as ``decode_audio``) and written to
``example[audio_key]`` with ``audio_in_video = True``; ``log_mel`` then makes
its features. A video with no audio stream, or a digitally silent one, gets
``audio_in_video = False`` and no waveform (a silent track is dropped, not
the video). An audio track that fails the ``decode_audio`` checks (NaN,
absurd sample rate, undecodable) skips the example with that reason.

Bad videos: undecodable bytes, no video stream, no decodable frame, or a
sampled frame that fails to decode (truncated or corrupt data) ->
``undecodable``; a missing path -> ``missing_media``; a side over 200x the
other -> ``bad_aspect_ratio``. With ``max_seconds``, only the first
``max_seconds`` of the video (and of its audio) are used (truncation).
"""

import io
import math
from fractions import Fraction

import av
import numpy as np

from data_pipelines import audio as audio_lib
from data_pipelines import vision
from data_pipelines.ops import (
  BadRecord,
  Example,
  Op,
  OpContext,
  read_media_bytes,
  register_op,
  require,
)

FPS = 2.0
MIN_FRAMES = 4
MAX_FRAMES = 768
VIDEO_MIN_PIXELS = 128 * 32 * 32
VIDEO_MAX_PIXELS = 768 * 32 * 32


def sample_frame_indices(
  total_frames: int,
  video_fps: float,
  fps: float,
  min_frames: int = MIN_FRAMES,
  max_frames: int = MAX_FRAMES,
  temporal_patch_size: int = vision.TEMPORAL_PATCH_SIZE,
) -> np.ndarray:
  """Indices of the frames to keep (``Qwen2VLVideoProcessor.sample_frames``)."""
  if total_frames < temporal_patch_size:
    return np.arange(total_frames)
  max_frames = math.floor(min(max_frames, total_frames) / temporal_patch_size) * temporal_patch_size
  num_frames = total_frames / video_fps * fps
  num_frames = min(max(num_frames, min_frames), max_frames, total_frames)
  num_frames = math.floor(num_frames / temporal_patch_size) * temporal_patch_size
  step = total_frames / num_frames
  return np.arange(0, total_frames, step).astype(np.float32).astype(np.int64)


def _video_fps(stream) -> float:
  rate = stream.average_rate or stream.guessed_rate or stream.base_rate
  if not rate or rate <= 0:
    raise BadRecord("undecodable", "video has no frame rate")
  return float(Fraction(rate))


def read_video(
  data: bytes,
  *,
  fps: float = FPS,
  min_frames: int = MIN_FRAMES,
  max_frames: int = MAX_FRAMES,
  temporal_patch_size: int = vision.TEMPORAL_PATCH_SIZE,
  max_seconds: float | None = None,
  audio: bool = True,
) -> dict:
  """Decodes sampled frames (uint8 (n, H, W, 3)) and the audio track.

  Returns:
    ``{"frames", "indices", "timestamps", "video_fps", "total_frames",
    "audio"}``: ``timestamps`` are the sampled frames' presentation times in
    seconds from the first frame; ``audio`` is ``(samples, rate)`` of the
    first audio stream (all of it, or its first ``max_seconds``) or None.
  """
  try:
    with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
      if not container.streams.video:
        raise BadRecord("undecodable", "no video stream")
      video_fps = _video_fps(container.streams.video[0])
      # Frames actually present (one packet each), counted without decoding.
      total = sum(1 for packet in container.demux(video=0) if packet.size)
    if max_seconds is not None:
      total = min(total, max(1, int(max_seconds * video_fps)))
    if total == 0:
      raise BadRecord("undecodable", "video has no frames")
    with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
      video_stream = container.streams.video[0]
      indices = sample_frame_indices(
        total, video_fps, fps, min_frames, max_frames, temporal_patch_size
      )
      wanted = {int(i) for i in indices}
      audio_stream = container.streams.audio[0] if audio and container.streams.audio else None
      streams = [video_stream] + ([audio_stream] if audio_stream else [])
      audio_needed = (
        int(max_seconds * audio_stream.codec_context.sample_rate)
        if audio_stream and max_seconds is not None
        else None
      )
      frames, times, audio_chunks, frame_index, audio_len = {}, {}, [], 0, 0
      start_time = None
      for packet in container.demux(streams):
        if packet.stream is video_stream:
          for frame in packet.decode():
            if frame_index == 0:
              start_time = frame.time
            if frame_index in wanted:
              frames[frame_index] = frame.to_ndarray(format="rgb24")
              times[frame_index] = frame.time
            frame_index += 1
        else:
          for frame in packet.decode():
            audio_chunks.append(audio_lib.frame_to_mono(frame))
            audio_len += len(audio_chunks[-1])
        audio_done = audio_stream is None or (
          audio_needed is not None and audio_len >= audio_needed
        )
        if frame_index > indices[-1] and audio_done:
          break  # Everything needed is decoded (e.g. with max_seconds).
  except av.FFmpegError as e:
    raise BadRecord("undecodable", f"video: {e}") from e
  missing = wanted - frames.keys()
  if missing:
    raise BadRecord("undecodable", f"{len(missing)} of {len(wanted)} sampled frames missing")
  track = None
  if audio_stream is not None:
    rate = int(audio_stream.codec_context.sample_rate or 0)
    samples = np.concatenate(audio_chunks) if audio_chunks else np.zeros((0,), np.float32)
    if max_seconds is not None and rate:
      samples = samples[: int(max_seconds * rate)]
    track = (samples, rate)
  timestamps = np.array(
    [
      times[i] - start_time if times[i] is not None and start_time is not None else i / video_fps
      for i in (int(i) for i in indices)
    ],
    np.float32,
  )
  return {
    "frames": np.stack([frames[int(i)] for i in indices]),
    "indices": indices,
    "timestamps": timestamps,
    "video_fps": video_fps,
    "total_frames": total,
    "audio": track,
  }


def audio_track(
  track: tuple[np.ndarray, int] | None,
  max_seconds: float | None = None,
  silence_peak: float = audio_lib.SILENCE_PEAK,
) -> np.ndarray | None:
  """A video's decoded ``(samples, rate)`` -> 16 kHz waveform, or None.

  None when there is no track, or it is (almost) empty or digitally silent:
  the video is then used without audio.

  Raises:
    BadRecord: ``bad_sample_rate`` or ``non_finite`` (see ``decode_audio``).
  """
  if track is None:
    return None
  try:
    samples = audio_lib.clean_waveform(*track, max_seconds=max_seconds)
  except BadRecord as e:
    if e.reason != "empty":
      raise
    return None
  return None if audio_lib.is_silent(samples, silence_peak) else samples


@register_op("decode_video")
def _decode_video(
  ctx: OpContext,
  key: str = "video",
  media_dir: str | None = None,
  fps: float = FPS,
  min_frames: int = MIN_FRAMES,
  max_frames: int = MAX_FRAMES,
  max_seconds: float | None = None,
  min_pixels: int = VIDEO_MIN_PIXELS,
  max_pixels: int = VIDEO_MAX_PIXELS,
  patch_size: int = vision.PATCH_SIZE,
  temporal_patch_size: int = vision.TEMPORAL_PATCH_SIZE,
  merge_size: int = vision.MERGE_SIZE,
  mean: tuple = vision.IMAGE_MEAN,
  std: tuple = vision.IMAGE_STD,
  audio: bool = True,
  audio_key: str = "audio",
  silence_peak: float = audio_lib.SILENCE_PEAK,
) -> Op:
  """``example[key]`` (bytes or path) -> video patches, timing and audio.

  Adds ``pixel_values_videos`` float32 ``(n_patches, 3 * T * p * p)``,
  ``video_grid_thw`` int64 ``[t, h, w]``, ``video_second_per_grid`` (float),
  ``video_timestamps`` float32 (seconds of each sampled frame),
  ``audio_in_video`` (bool) and, when True, ``example[audio_key]`` (float32
  16 kHz mono) with ``sample_rate`` and ``audio_seconds``. Drops
  ``example[key]``.
  """
  del ctx
  if fps <= 0 or min_frames < 1 or max_frames < temporal_patch_size:
    raise ValueError(f"decode_video: bad {fps=}, {min_frames=}, {max_frames=}")
  factor = patch_size * merge_size

  def op(example: Example) -> Example:
    data = read_media_bytes(require(example, key), media_dir)
    video = read_video(
      data,
      fps=fps,
      min_frames=min_frames,
      max_frames=max_frames,
      temporal_patch_size=temporal_patch_size,
      max_seconds=max_seconds,
      audio=audio,
    )
    frames = vision.resize_frames(video["frames"], min_pixels, max_pixels, factor)
    pixel_values, grid = vision.patchify(
      vision.normalize(frames, mean, std), patch_size, temporal_patch_size, merge_size
    )
    sampled_fps = len(video["indices"]) / video["total_frames"] * video["video_fps"]
    out = {k: v for k, v in example.items() if k != key}
    out.update(
      pixel_values_videos=pixel_values,
      video_grid_thw=grid,
      video_second_per_grid=temporal_patch_size / sampled_fps,
      video_timestamps=video["timestamps"],
      audio_in_video=False,
    )
    samples = audio_track(video["audio"], max_seconds, silence_peak)
    if samples is not None:
      out.update(
        {
          audio_key: samples,
          "sample_rate": audio_lib.SAMPLE_RATE,
          "audio_seconds": len(samples) / audio_lib.SAMPLE_RATE,
          "audio_in_video": True,
        }
      )
    return out

  return op


def encode_video(
  frames: np.ndarray,
  fps: float,
  audio: np.ndarray | None = None,
  audio_rate: int = 16000,
  crf: int = 23,
) -> bytes:
  """uint8 RGB frames (n, H, W, 3) [+ float mono audio] -> MP4 (H.264 + AAC).

  H and W must be even (yuv420p). Used to write test and local-corpus videos.
  """
  buffer = io.BytesIO()
  with av.open(buffer, mode="w", format="mp4") as container:
    video_stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
    video_stream.height, video_stream.width = frames.shape[1:3]
    video_stream.pix_fmt = "yuv420p"
    video_stream.options = {"crf": str(crf), "preset": "veryfast"}
    audio_stream = None
    if audio is not None:
      audio_stream = container.add_stream("aac", rate=audio_rate)
      audio_stream.layout = "mono"
    for frame in frames:
      container.mux(
        video_stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24"))
      )
    container.mux(video_stream.encode(None))
    if audio_stream is not None:
      audio_frame = av.AudioFrame.from_ndarray(
        np.asarray(audio, np.float32)[None], format="fltp", layout="mono"
      )
      audio_frame.sample_rate = audio_rate
      container.mux(audio_stream.encode(audio_frame))
      container.mux(audio_stream.encode(None))
  return buffer.getvalue()
