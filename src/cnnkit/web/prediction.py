"""Turning image requests into ranked predictions, many requests per forward pass.

Small images are decoded in the batch thread itself, which saves a thread hop per request; large
photos and drawings (which need more work) are prepared in the thread pool first, so they do not
hold up the batch. "Small" is counted in pixels, read from the file's header: a few kilobytes of
PNG can hold 64 megapixels. Only ``HEAVY_PREPARES`` of those are prepared at once, whatever the
number of requests: one such image can take hundreds of megabytes while it is decoded.

For a symbol model, a drawing is cropped to its ink and re-drawn in the training data's form:
every canvas drawing, and every upload of another size than the model's stored input (a photo
or scan of a symbol on a page, or a small icon). That form is scikit-learn's digits'
(:func:`canvas_to_digit`) for a model trained on them, else HASYv2's (:func:`canvas_to_symbol`).
An upload of the training images' own size, such as a HASYv2 PNG (or one of the digits' 8x8
scans, for a model trained on them), is used as it is, so it predicts as ``cnnkit predict`` does.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from cnnkit.data.image import BadImageError, decode_image, image_size
from cnnkit.data.prepare import prepare_image, upright
from cnnkit.inference.predictor import Prediction, Predictor
from cnnkit.web.batching import MicroBatcher, PerLoop
from cnnkit.web.drawing import DIGIT_SIZE, canvas_to_digit, canvas_to_symbol
from cnnkit.web.upload import ImageRequest

logger = logging.getLogger(__name__)

# Images of up to this many pixels (a 1000x1000 photo) are decoded in the batch thread.
INLINE_DECODE_PIXELS = 1_000_000
# Larger ones are prepared this many at a time: a 64-megapixel PNG of 18 kB took about 380 MB
# (and 0.9 s) to crop to its ink, and eight at once took the server from 0.3 to 3.2 GB.
HEAVY_PREPARES = 2


class PredictionService:
    """Ranks the classes of uploaded images with one model, batching concurrent requests.

    Args:
        predictor: the model.
        max_batch_size: the most images in one forward pass.
        max_wait_seconds: how long a lone request waits for company before running.
    """

    def __init__(
        self, predictor: Predictor, max_batch_size: int = 16, max_wait_seconds: float = 0.002
    ) -> None:
        self.predictor = predictor
        self.batcher: MicroBatcher[tuple[Any, int]] = MicroBatcher(
            self._run_batch, max_batch_size, max_wait_seconds
        )
        # Places for heavy prepares, in the loop that first waits on them.
        self._heavy = PerLoop(lambda: asyncio.Semaphore(HEAVY_PREPARES))

    def prepare(self, image_request: ImageRequest) -> np.ndarray:
        """Decode, turn a drawing into training form, and convert to ``uint8 [S, S, C]``.

        Raises:
            HTTPException: 400 for data that is not a readable image (or is a decompression bomb).
        """
        try:
            # Upright first: a phone photo of a drawn symbol is stored sideways, and cropping
            # to its ink re-draws it without its EXIF.
            image = upright(decode_image(image_request.data, "uploaded file"))
            if self.crops_to_ink(image_request.source, image.size):
                image = self._in_training_form(image)
            return prepare_image(image, self.predictor.metadata.preprocessing)
        except BadImageError as error:
            raise HTTPException(400, str(error)) from None
        except ValueError as error:  # Pillow's own, for an image it decoded but cannot convert.
            raise HTTPException(400, f"uploaded file: cannot use this image ({error})") from None

    async def predict(self, image_request: ImageRequest) -> list[Prediction]:
        """The ``top_k`` predictions for one request, best first."""
        payload: ImageRequest | np.ndarray = image_request
        if not self._decodes_quickly(image_request):
            payload = await self._prepare_heavy(image_request)
        return await self.batcher.submit((payload, image_request.top_k))

    async def _prepare_heavy(self, image_request: ImageRequest) -> np.ndarray:
        """:meth:`prepare` in the thread pool, ``HEAVY_PREPARES`` at a time. A place is given
        back when its thread is done, also when the request is cancelled before that: the
        thread goes on decoding, and holds its memory, until then."""
        places = self._heavy.get()
        await places.acquire()
        try:
            work = asyncio.ensure_future(run_in_threadpool(self.prepare, image_request))
        except BaseException:
            places.release()
            raise
        work.add_done_callback(lambda done: _release_after(done, places))
        return await asyncio.shield(work)

    def crops_to_ink(self, source: str, size: tuple[int, int]) -> bool:
        """Whether an image of ``size`` (width, height) is re-drawn in the training data's form.

        Args:
            source: ``"canvas"`` for a drawing from the page, ``"upload"`` for a file.
            size: the image's width and height in pixels.

        Returns:
            True for a symbol model and either a canvas drawing or an upload of any size but
            the training images' own: only an image of that size (a HASYv2 PNG at the stored
            input size, or one of the digits' 8x8 scans for a model trained on them) can be in
            the training data's form already.
        """
        if self.predictor.metadata.kind != "symbols":
            return False
        stored_size = self.predictor.metadata.preprocessing.stored_size
        training_sizes = {(stored_size, stored_size)}
        if self._trained_on_digits():
            training_sizes.add((DIGIT_SIZE, DIGIT_SIZE))
        return source == "canvas" or tuple(size) not in training_sizes

    def _trained_on_digits(self) -> bool:
        return self.predictor.metadata.training.get("dataset") == "digits"

    def _in_training_form(self, drawing: Any) -> Any:
        """A drawing re-drawn in the form of the data the model trained on: a model trained
        on the digits scored 90% on drawings of their test split in their form, against 79%
        in HASYv2's (``benchmarks/canvas_digits.py``)."""
        if self._trained_on_digits():
            return canvas_to_digit(drawing)
        return canvas_to_symbol(drawing)

    def _decodes_quickly(self, image_request: ImageRequest) -> bool:
        """Whether the batch thread may decode this image itself: one that is not cropped to its
        ink and whose header declares at most ``INLINE_DECODE_PIXELS``, or data that is no
        image."""
        try:
            size = image_size(image_request.data)
        except BadImageError:
            # Refused as quickly in the batch thread; a canvas drawing never decodes there.
            return image_request.source != "canvas"
        if self.crops_to_ink(image_request.source, size):
            return False
        return size[0] * size[1] <= INLINE_DECODE_PIXELS

    def _run_batch(self, jobs: list[tuple[Any, int]]) -> list[Any]:
        """Prepare what is not yet prepared, run one forward pass, rank each image."""
        results: list[Any] = [None] * len(jobs)
        arrays, positions = [], []
        for position, (payload, _) in enumerate(jobs):
            try:
                arrays.append(payload if isinstance(payload, np.ndarray) else self.prepare(payload))
                positions.append(position)
            except HTTPException as error:
                results[position] = error
            except Exception as error:  # One odd image must not fail the others in its batch.
                logger.exception("could not prepare an image")
                results[position] = error
        if arrays:
            probabilities = self.predictor.probabilities(np.stack(arrays))
            for row, position in zip(probabilities, positions, strict=True):
                results[position] = self.predictor.rank(row[None], jobs[position][1])[0]
        return results

    async def close(self) -> None:
        """Stop the batch worker."""
        await self.batcher.close()


def _release_after(work: asyncio.Future, places: asyncio.Semaphore) -> None:
    places.release()
    if not work.cancelled():
        work.exception()  # Read, so a request cancelled meanwhile logs no "never retrieved".
