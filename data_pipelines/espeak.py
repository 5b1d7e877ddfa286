"""Offline text-to-speech with eSpeak NG, from the ``espeakng-loader`` wheel.

The wheel bundles ``libespeak-ng.so`` and its ``espeak-ng-data``, so no system
package is needed; this module drives the library's C API through ctypes
(``espeak_Initialize`` in synchronous mode, a synth callback collecting the
16-bit samples). eSpeak NG keeps global state, so calls in one process are
serialised by a lock; worker processes each load their own copy.

  samples, rate = synthesize("three red squares", voice="en-us+f3", rate=160)
  # int16 mono at espeak's native 22050 Hz.
"""

import ctypes
import threading

import espeakng_loader
import numpy as np

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE = 1  # Words per minute.
_PARAM_PITCH = 3  # 0..100.
_CALLBACK = ctypes.CFUNCTYPE(
  ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)

_lock = threading.Lock()
_state: dict = {}


def _library():
  """Loads and initialises libespeak-ng once per process."""
  if "lib" not in _state:
    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [
      ctypes.c_char_p,
      ctypes.c_size_t,
      ctypes.c_uint,
      ctypes.c_int,
      ctypes.c_uint,
      ctypes.c_uint,
      ctypes.c_void_p,
      ctypes.c_void_p,
    ]
    rate = lib.espeak_Initialize(
      _AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0
    )
    if rate <= 0:
      raise RuntimeError(f"espeak_Initialize failed ({rate})")
    chunks = []

    def collect(wav, num_samples, events):
      del events
      if num_samples > 0:
        chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
      return 0

    callback = _CALLBACK(collect)  # Kept alive in _state.
    lib.espeak_SetSynthCallback(callback)
    _state.update(lib=lib, rate=rate, chunks=chunks, callback=callback)
  return _state["lib"]


def synthesize(
  text: str, voice: str = "en-us", rate: int = 160, pitch: int = 50
) -> tuple[np.ndarray, int]:
  """Speaks ``text``: int16 mono samples and their sample rate (22050 Hz).

  Args:
    text: what to say (UTF-8).
    voice: an eSpeak voice name, optionally with a variant (``"en-gb+m3"``).
    rate: speed in words per minute (80..450).
    pitch: base pitch, 0..100.
  """
  with _lock:
    lib = _library()
    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
      raise ValueError(f"Unknown espeak voice {voice!r}")
    lib.espeak_SetParameter(_PARAM_RATE, rate, 0)
    lib.espeak_SetParameter(_PARAM_PITCH, pitch, 0)
    chunks = _state["chunks"]
    chunks.clear()
    data = text.encode("utf-8") + b"\0"
    error = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
    if error != 0:
      raise RuntimeError(f"espeak_Synth failed ({error}) on {text!r}")
    lib.espeak_Synchronize()
    samples = (np.concatenate(chunks) if chunks else np.zeros((0,), np.int16)).astype(np.int16)
    chunks.clear()
    return samples, _state["rate"]
