"""Video, mask and dataset IO for propagation and evaluation.

- frames: `VideoReader` streams a folder of frames (.jpg/.png in frame order, numbers by value) or a video file
  (OpenCV) as uint8 RGB arrays; `read_video` loads it whole when asked; `frame_to_tensor` makes (3, H, W) float
  tensors.
- masks: `read_mask` reads DAVIS-2017 palette PNGs (object ids) and DAVIS-2016 0/255 PNGs (255 -> object 1);
  `write_mask` writes palette PNGs with the standard DAVIS palette (`DAVIS_PALETTE`).
- overlays: `overlay`, `write_overlays` (PNG per frame), `contact_sheet`, `write_overlay_video` (MP4 via OpenCV).
- `DavisDataset`: the DAVIS layout `JPEGImages/<res>/<seq>`, `Annotations/<res>/<seq>`, optional ImageSets list.
"""

from .davis import DavisDataset
from .masks import DAVIS_PALETTE, read_mask, write_mask
from .overlay import contact_sheet, overlay, write_overlay_video, write_overlays
from .video import IMAGE_EXTENSIONS, VideoReader, frame_to_tensor, read_video

__all__ = [
    "DAVIS_PALETTE", "IMAGE_EXTENSIONS", "DavisDataset", "VideoReader", "contact_sheet", "frame_to_tensor",
    "overlay", "read_mask", "read_video", "write_mask", "write_overlay_video", "write_overlays",
]
