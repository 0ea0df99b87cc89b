// cnnkit web page: a drawing canvas for symbol models, a photo upload for photo models.
// Plain JavaScript with no external assets; every failure is shown in the error box.
"use strict";

(function () {
  const TOP_K = 5;
  const DEBOUNCE_MS = 200;
  const STROKE_FRACTION = 0.035; // Stroke width as a fraction of the canvas side.

  const $ = (id) => document.getElementById(id);
  // The script runs: the page's notice that it did not load goes before it shows.
  const notice = $("script-notice");
  if (notice) notice.remove();
  const errorBox = $("error");
  const statusLine = $("status");
  const resultsList = $("results");
  let model = null;
  let requestNumber = 0;
  let inFlight = null;
  // The request number when the error box last showed a message: a prediction asked for
  // before then must not clear it when its answer comes (a file over the limit, chosen while
  // the drawing's prediction was on its way, would lose its message).
  let errorShownAt = -1;

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = false;
    errorShownAt = requestNumber;
  }

  function clearError() {
    errorBox.hidden = true;
    errorBox.textContent = "";
  }

  window.addEventListener("error", (event) => showError("Something went wrong in the page: " + event.message));
  window.addEventListener("unhandledrejection", (event) => {
    showError("Something went wrong: " + (event.reason && event.reason.message ? event.reason.message : event.reason));
  });

  function displayName(label) {
    // Folder-per-class names may look like "001.Black_footed_Albatross" (CUB's image
    // folders); a name such as "1.5" keeps its digits.
    return label.replace(/^\d+\.(?=\D)/, "").replace(/_/g, " ");
  }

  function percent(confidence) {
    return (confidence * 100).toFixed(confidence >= 0.995 ? 0 : 1) + "%";
  }

  function copyWithTextarea(text) {
    // The old way, for pages that are not a secure context or where the Clipboard API refuses:
    // a hidden textarea takes the focus for a moment, so it goes back where it was.
    const focused = document.activeElement;
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "visually-hidden";
    document.body.appendChild(area);
    try {
      area.select();
      return document.execCommand("copy"); // False when the browser did not copy.
    } finally {
      area.remove();
      if (focused && focused !== document.body) focused.focus();
    }
  }

  async function copyText(text, button) {
    let copied = false;
    if (navigator.clipboard && window.isSecureContext) {
      try {
        await navigator.clipboard.writeText(text);
        copied = true;
      } catch (refused) { /* No permission, or the page lost the focus: try the old way. */ }
    }
    if (!copied) {
      try {
        copied = copyWithTextarea(text);
      } catch (ignored) { /* Reported below. */ }
    }
    if (!copied) {
      showError("Could not copy to the clipboard; select the text and copy it instead.");
      return;
    }
    button.textContent = "Copied";
    button.setAttribute("aria-label", "Copied " + text);
    clearTimeout(button.restoreTimer); // A second click within the pause restarts it.
    button.restoreTimer = setTimeout(() => {
      button.textContent = "Copy";
      button.setAttribute("aria-label", "Copy " + text);
    }, 1200);
  }

  function meter(confidence) {
    const wrapper = document.createElement("div");
    wrapper.className = "meter";
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.setAttribute("aria-hidden", "true");
    const fill = document.createElement("div");
    fill.className = "bar-fill";
    fill.style.width = Math.max(0.5, confidence * 100).toFixed(1) + "%";
    bar.appendChild(fill);
    const value = document.createElement("span");
    value.className = "confidence";
    value.textContent = percent(confidence);
    wrapper.append(bar, value);
    return wrapper;
  }

  function symbolItem(prediction) {
    const item = document.createElement("li");
    item.className = "result";
    // At its own size (a dot stays small, x smaller than X), centred in a fixed box.
    const box = document.createElement("span");
    box.className = "symbol-box";
    // The server leaves out the picture of a very long label: the box then stays empty.
    if (typeof prediction.render === "string" && prediction.render) {
      const image = document.createElement("img");
      image.className = "symbol";
      image.src = prediction.render;
      image.alt = ""; // The LaTeX code next to it says the same to a screen reader.
      image.addEventListener("error", () => image.remove()); // No broken-image icon.
      box.appendChild(image);
    }
    const body = document.createElement("div");
    const head = document.createElement("div");
    head.className = "result-head";
    const code = document.createElement("code");
    code.className = "latex";
    code.textContent = prediction.label;
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy";
    copy.textContent = "Copy";
    copy.setAttribute("aria-label", "Copy " + prediction.label);
    copy.addEventListener("click", () => copyText(prediction.label, copy));
    head.append(code, copy);
    body.append(head, meter(prediction.confidence));
    item.append(box, body);
    return item;
  }

  function photoItem(prediction, rank) {
    const item = document.createElement("li");
    item.className = "result photo";
    const number = document.createElement("span");
    number.className = "rank";
    number.textContent = String(rank + 1);
    const body = document.createElement("div");
    const name = document.createElement("span");
    name.className = "label";
    name.textContent = displayName(prediction.label);
    name.title = prediction.label;
    body.append(name, meter(prediction.confidence));
    item.append(number, body);
    return item;
  }

  function replaceResults(items) {
    // Removing a focused Copy button would drop the keyboard focus to the page: it goes to the
    // Copy button at the same rank in the new list instead, or to the heading if there is none.
    const copies = () => Array.from(resultsList.querySelectorAll("button.copy"));
    const rank = copies().indexOf(document.activeElement);
    resultsList.replaceChildren(...items);
    if (rank < 0) return;
    const same = copies()[rank];
    if (same) same.focus();
    else $("results-title").focus();
  }

  function showResults(predictions) {
    replaceResults(
      predictions.map((p, rank) => (model.kind === "symbols" ? symbolItem(p) : photoItem(p, rank)))
    );
    const best = predictions[0];
    const name = model.kind === "symbols" ? best.label : displayName(best.label);
    setStatus("Best guess: " + name + " (" + percent(best.confidence) + ")");
  }

  function setStatus(message) {
    statusLine.textContent = message;
    // A copy next to the canvas, for narrow screens where the results sit below it.
    const near = $("canvas-status");
    if (near) near.textContent = message;
  }

  function resetResults(message) {
    requestNumber += 1; // Any answer still on its way is now stale.
    if (inFlight) inFlight.abort();
    // The aborted request's own clean-up skips a stale number, so it cannot do this.
    resultsList.removeAttribute("aria-busy");
    replaceResults([]);
    setStatus(message);
    // An error was about the results that are gone now (undoing to an empty canvas after a
    // failed prediction must not leave its message up); a caller with a new one shows it after.
    clearError();
  }

  function sameModel(served) {
    // The server may have been restarted with another model while the page stayed open.
    return !served || (served.architecture === model.architecture && served.kind === model.kind &&
      served.num_classes === model.num_classes);
  }

  async function errorMessage(response) {
    try {
      const body = await response.json();
      if (body && body.error) return body.error;
    } catch (ignored) { /* Not JSON: fall through. */ }
    return "The server answered " + response.status + " " + response.statusText;
  }

  async function readJson(response) {
    // Undefined for a body that is not JSON (or breaks off): the callers' checks reject it.
    try {
      return await response.json();
    } catch (ignored) {
      return undefined;
    }
  }

  function isModel(value) {
    return Boolean(value) && typeof value.architecture === "string" &&
      (value.kind === "symbols" || value.kind === "photos") &&
      Number.isInteger(value.num_classes) && value.num_classes > 0;
  }

  function isPrediction(value) {
    return Boolean(value) && typeof value.label === "string" && value.label !== "" &&
      typeof value.confidence === "number" && value.confidence >= 0 && value.confidence <= 1;
  }

  function isAnswer(body) {
    return Boolean(body) && Array.isArray(body.predictions) && body.predictions.length > 0 &&
      body.predictions.every(isPrediction);
  }

  function noPrediction(message) {
    replaceResults([]);
    setStatus("No prediction.");
    showError(message);
  }

  function megabytes(bytes) {
    return (bytes / 1e6).toFixed(1) + " MB";
  }

  function isTooLarge(blob) {
    return Boolean(model.max_upload_bytes) && blob.size > model.max_upload_bytes;
  }

  function showTooLarge(blob) {
    showError("The file is " + megabytes(blob.size) + "; the limit is " + megabytes(model.max_upload_bytes) + ".");
  }

  async function predict(blob, source, filename) {
    if (isTooLarge(blob)) {
      resetResults("No prediction.");
      showTooLarge(blob);
      return;
    }
    const number = ++requestNumber;
    if (inFlight) inFlight.abort();
    inFlight = new AbortController();
    const form = new FormData();
    form.append("file", blob, filename);
    form.append("source", source);
    form.append("top_k", String(TOP_K));
    // Screen readers hear the status line: while drawing, say "Predicting…" only when nothing
    // is shown yet, not on every update (aria-busy marks the list meanwhile).
    if (source !== "canvas" || !resultsList.children.length) setStatus("Predicting…");
    resultsList.setAttribute("aria-busy", "true");
    try {
      let response;
      try {
        response = await fetch("/api/predict", { method: "POST", body: form, signal: inFlight.signal });
      } catch (error) {
        if (error.name !== "AbortError" && number === requestNumber) {
          noPrediction("Could not reach the server: " + error.message);
        }
        return;
      }
      if (number !== requestNumber) return;
      if (!response.ok) {
        const message = await errorMessage(response);
        if (number !== requestNumber) return;
        noPrediction(message);
        return;
      }
      const body = await readJson(response);
      if (number !== requestNumber) return;
      if (!isAnswer(body)) {
        noPrediction(
          "The server sent an unexpected answer to the prediction request; try again, or reload the page."
        );
        return;
      }
      if (!sameModel(body.model)) {
        noPrediction("The server now serves another model; reload the page.");
        return;
      }
      if (number > errorShownAt) clearError();
      showResults(body.predictions);
    } finally {
      if (number === requestNumber) resultsList.removeAttribute("aria-busy");
    }
  }

  // A file dropped anywhere on the page goes to ``use``; the browser never navigates away to
  // it. Drags of the page's own text or images are left alone.
  function acceptDroppedFiles(use, highlight) {
    const carriesFiles = (event) =>
      event.dataTransfer && Array.from(event.dataTransfer.types || []).includes("Files");
    let depth = 0; // dragenter/dragleave pairs, as they fire on every element crossed.
    document.addEventListener("dragenter", (event) => {
      if (!carriesFiles(event)) return;
      depth += 1;
      highlight(true);
    });
    document.addEventListener("dragleave", (event) => {
      if (!carriesFiles(event)) return;
      depth = Math.max(0, depth - 1);
      if (depth === 0) highlight(false);
    });
    document.addEventListener("dragover", (event) => {
      if (carriesFiles(event)) event.preventDefault();
    });
    document.addEventListener("drop", (event) => {
      if (!carriesFiles(event)) return;
      event.preventDefault();
      depth = 0;
      highlight(false);
      const file = event.dataTransfer.files[0];
      if (file) use(file);
      else showError("Drop an image file (a JPEG, PNG, WebP or GIF).");
    });
  }

  // ----- Symbols: the drawing canvas -----

  function setUpCanvas() {
    const canvas = $("canvas");
    const context = canvas.getContext("2d");
    const undoButton = $("undo");
    const clearButton = $("clear");
    const strokes = []; // Each stroke is a list of [x, y] in 0..1 canvas coordinates.
    let current = null;
    let pointer = null; // The one pointer drawing now; a second finger is ignored.
    let timer = null;
    let drawingVersion = 0; // Bumped on every change, so a stale snapshot is never sent.
    // An uploaded image, shown on the canvas as its preview until a stroke or Clear replaces
    // it; it is never part of a drawing that is sent.
    let upload = null; // { image, url }
    const drawingLabel = canvas.getAttribute("aria-label");

    function fitBackingStore() {
      // clientWidth is the drawing area inside the border.
      const side = Math.round(canvas.clientWidth * (window.devicePixelRatio || 1));
      if (side > 0 && canvas.width !== side) {
        canvas.width = side;
        canvas.height = side;
        redraw();
      }
    }

    function stylePen() {
      context.lineCap = "round";
      context.lineJoin = "round";
      context.strokeStyle = "#000";
      context.fillStyle = "#000";
      context.lineWidth = Math.max(2, canvas.width * STROKE_FRACTION);
    }

    function drawStroke(points) {
      const side = canvas.width;
      if (points.length === 1) {
        context.beginPath();
        context.arc(points[0][0] * side, points[0][1] * side, context.lineWidth / 2, 0, 2 * Math.PI);
        context.fill();
        return;
      }
      context.beginPath();
      context.moveTo(points[0][0] * side, points[0][1] * side);
      for (const [x, y] of points.slice(1)) context.lineTo(x * side, y * side);
      context.stroke();
    }

    function redraw() {
      context.fillStyle = "#fff";
      context.fillRect(0, 0, canvas.width, canvas.height);
      if (upload && upload.image.complete && upload.image.naturalWidth > 0) drawUpload(upload.image);
      stylePen();
      strokes.forEach(drawStroke);
      undoButton.disabled = strokes.length === 0;
      clearButton.disabled = strokes.length === 0 && !upload;
    }

    function drawUpload(image) {
      // The whole image, centred, as large as fits with a small margin; a small one (a 32x32
      // HASYv2 PNG) keeps its pixels sharp rather than blurred.
      const side = canvas.width * 0.9;
      const scale = Math.min(side / image.naturalWidth, side / image.naturalHeight);
      const width = image.naturalWidth * scale;
      const height = image.naturalHeight * scale;
      context.imageSmoothingEnabled = scale < 2;
      context.drawImage(image, (canvas.width - width) / 2, (canvas.height - height) / 2, width, height);
      context.imageSmoothingEnabled = true;
    }

    function showUpload(file) {
      dropUpload();
      const image = new Image();
      const shown = { image, url: URL.createObjectURL(file) };
      upload = shown;
      image.addEventListener("load", () => { if (upload === shown) redraw(); });
      // Not an image the browser reads: no preview (the server's answer says what is wrong).
      image.addEventListener("error", () => { if (upload === shown) { dropUpload(); redraw(); } });
      image.src = shown.url;
      canvas.setAttribute("aria-label", "Uploaded image " + file.name + "; draw to replace it");
    }

    function dropUpload() {
      if (!upload) return;
      URL.revokeObjectURL(upload.url);
      upload = null;
      canvas.setAttribute("aria-label", drawingLabel);
    }

    function position(event) {
      const box = canvas.getBoundingClientRect();
      const left = box.left + canvas.clientLeft;
      const top = box.top + canvas.clientTop;
      return [(event.clientX - left) / canvas.clientWidth, (event.clientY - top) / canvas.clientHeight];
    }

    function schedulePrediction() {
      clearTimeout(timer);
      const version = ++drawingVersion;
      if (strokes.length === 0) {
        resetResults("Draw a symbol to see predictions.");
        return;
      }
      timer = setTimeout(() => {
        canvas.toBlob((blob) => {
          if (version !== drawingVersion) return; // Drawn on, undone or cleared since.
          if (blob) predict(blob, "canvas", "drawing.png");
          else showError("Could not read the drawing from the canvas.");
        }, "image/png");
      }, DEBOUNCE_MS);
    }

    canvas.addEventListener("pointerdown", (event) => {
      // Only the main button draws: the left mouse button, or a finger's or a pen tip's contact
      // (a pen's barrel button or eraser is another button).
      if (current || event.button !== 0) return;
      event.preventDefault();
      canvas.setPointerCapture(event.pointerId);
      pointer = event.pointerId;
      dropUpload(); // A new drawing starts on a blank canvas.
      current = [position(event)];
      strokes.push(current);
      redraw();
    });

    canvas.addEventListener("pointermove", (event) => {
      if (!current || event.pointerId !== pointer) return;
      event.preventDefault();
      const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
      for (const each of events.length ? events : [event]) current.push(position(each));
      redraw();
      schedulePrediction();
    });

    function endStroke(event) {
      if (!current || event.pointerId !== pointer) return;
      current = null;
      pointer = null;
      if (canvas.hasPointerCapture(event.pointerId)) canvas.releasePointerCapture(event.pointerId);
      schedulePrediction();
    }
    canvas.addEventListener("pointerup", endStroke);
    canvas.addEventListener("pointercancel", endStroke);
    // Capture lost without a pointerup (a system gesture, a window switch) ends the stroke too,
    // so the canvas never stays locked on an unfinished one.
    canvas.addEventListener("lostpointercapture", endStroke);

    function undo() {
      if (strokes.length === 0 || current) return;
      const focused = document.activeElement;
      strokes.pop();
      redraw();
      schedulePrediction();
      // A button disabled now (Undo, or Clear for Ctrl+Z) loses the keyboard focus; keep it on
      // the drawing.
      if (focused && focused.disabled) canvas.focus();
    }
    undoButton.addEventListener("click", undo);
    clearButton.addEventListener("click", () => {
      if (current) return;
      strokes.length = 0;
      dropUpload();
      redraw();
      clearError();
      schedulePrediction();
      canvas.focus();
    });
    document.addEventListener("keydown", (event) => {
      const typing = event.target instanceof HTMLInputElement || event.target instanceof HTMLTextAreaElement;
      // Ctrl+Shift+Z is redo in most programs (and Alt makes another shortcut): neither undoes.
      const undoKeys = (event.ctrlKey || event.metaKey) && !event.shiftKey && !event.altKey;
      if (!typing && undoKeys && event.key.toLowerCase() === "z") {
        event.preventDefault();
        undo();
      }
    });

    function watchPixelRatio() {
      // Browser zoom or a move to another screen can change devicePixelRatio and not the
      // canvas's size in CSS pixels, which is all ResizeObserver sees. A query matches only the
      // ratio it was made for, so a new one is armed after each change.
      const query = window.matchMedia(`(resolution: ${window.devicePixelRatio || 1}dppx)`);
      query.addEventListener("change", () => {
        fitBackingStore();
        watchPixelRatio();
      }, { once: true });
    }

    new ResizeObserver(fitBackingStore).observe(canvas);
    watchPixelRatio();
    fitBackingStore();
    redraw();
    setStatus("Draw a symbol to see predictions.");
    function useUpload(file) {
      // A file over the limit is refused before anything changes: the drawing and its results
      // stay, and the user loses nothing to a file that was never sent.
      if (isTooLarge(file)) {
        showTooLarge(file);
        return;
      }
      // The results are the upload's now: the drawing goes, and no stale drawing is sent. The
      // canvas shows the upload instead.
      strokes.length = 0;
      clearTimeout(timer);
      drawingVersion += 1;
      showUpload(file);
      redraw();
      clearError();
      predict(file, "upload", file.name);
    }
    $("symbol-file").addEventListener("change", (event) => {
      const file = event.target.files[0];
      event.target.value = ""; // Choosing the same file again still counts.
      if (file) useUpload(file);
    });
    acceptDroppedFiles(useUpload, () => {});
  }

  // ----- Photos: drag and drop or file picker -----

  function setUpPhotos() {
    const dropzone = $("dropzone");
    const input = $("photo-file");
    const figure = $("preview-figure");
    const preview = $("preview");
    let previewUrl = null;

    function useFile(file) {
      if (!file) return;
      clearError();
      if (previewUrl) URL.revokeObjectURL(previewUrl);
      previewUrl = null;
      if (model.max_upload_bytes && file.size > model.max_upload_bytes) {
        figure.hidden = true; // predict() says why, and sends nothing.
        predict(file, "upload", file.name);
        return;
      }
      previewUrl = URL.createObjectURL(file);
      preview.src = previewUrl;
      $("preview-caption").textContent = file.name;
      figure.hidden = false;
      predict(file, "upload", file.name);
    }

    preview.addEventListener("error", () => { figure.hidden = true; });
    input.addEventListener("change", () => {
      const file = input.files[0];
      input.value = ""; // Choosing the same file again still counts.
      if (file) useFile(file);
    });
    acceptDroppedFiles(useFile, (dragging) => dropzone.classList.toggle("dragging", dragging));
    setStatus("Choose a photo to see what the model takes it for.");
  }

  function modelUnavailable(message) {
    $("model-info").textContent = "No model information.";
    setStatus("Unavailable.");
    showError(message);
  }

  async function start() {
    let response;
    try {
      response = await fetch("/api/model");
    } catch (error) {
      modelUnavailable("Could not reach the server: " + error.message);
      return;
    }
    if (!response.ok) {
      modelUnavailable("Could not load the model description: " + (await errorMessage(response)));
      return;
    }
    const described = await readJson(response);
    if (!isModel(described)) {
      modelUnavailable(
        "The server sent an unexpected answer for the model description (/api/model); " +
        "reload the page, or check the server."
      );
      return;
    }
    model = described;
    const what = model.kind === "symbols" ? "handwritten symbols" : "photos";
    $("model-info").textContent = model.architecture + " · " + model.num_classes + " classes · " + what;
    if (model.kind === "symbols") {
      $("symbols-panel").hidden = false;
      setUpCanvas();
    } else {
      $("photos-panel").hidden = false;
      setUpPhotos();
    }
  }

  start();
})();
