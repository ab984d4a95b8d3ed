"""Special ids and strings shared with the original MobileVLM / LLaVA code."""

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
IMAGE_PLACEHOLDER = "<image-placeholder>"

# The rest of the original's constants (its gradio controller/worker and logger read them; nothing here does).
CONTROLLER_HEART_BEAT_EXPIRATION = 30
WORKER_HEART_BEAT_INTERVAL = 15
LOGDIR = "."

# Decompression-bomb guard for every image we open (CLI, server, data loaders): 64 megapixels.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
# Longer side over shorter side: beyond this, preprocessing would allocate a strip far larger than the image.
MAX_ASPECT_RATIO = 50
