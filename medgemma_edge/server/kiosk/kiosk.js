// The kiosk page: upload an image to POST /v1/images (or pick a study from the worklist:
// worklist.js), show what the model sees, stream the answer from POST /v1/chat/completions.
// Plain browser JavaScript, no build step, nothing fetched from outside this server. The HTTP API
// is the one in docs/server.md.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const progress = window.MedGemmaProgress; // the bar before the first token (progress.js)
  const KEY_STORE = "medgemma-edge.api-key"; // sessionStorage: gone when the tab closes
  const POLL_MS = 500; // how often to ask whether the uploaded image is encoded yet
  const HEALTH_RETRY_MS = 2000; // while the server is still loading the model
  const MAX_ERROR_CHARS = 300; // an error is one readable line, never a page of HTML
  // Folder clutter that is not a picture (macOS, Windows and DICOM media index files).
  const SKIP_NAME = /^(\..*|DICOMDIR|Thumbs\.db|desktop\.ini)$/i;

  const state = {
    modelId: null,
    ready: false, // the server has a model: asking and uploading are allowed
    image: null, // the POST /v1/images answer of the current upload
    study: null, // or a study of the worklist: {url, caption} (worklist.js)
    files: [], // kept so a new CT window can re-upload them
    upload: 0, // bumped per upload, so a slow older upload cannot overwrite a newer one
    previewUrl: null,
    controller: null, // aborts the streaming answer (the server then frees the model)
  };

  // ---- talking to the server ----------------------------------------------------------------

  function authHeaders(extra) {
    const headers = Object.assign({}, extra);
    const key = $("api-key").value.trim();
    if (key) headers.Authorization = "Bearer " + key;
    return headers;
  }

  async function errorLine(response) {
    let message = "";
    const text = await response.text().catch(() => "");
    try {
      message = JSON.parse(text).error.message;
    } catch (_) {
      message = text.replace(/<[^>]*>/g, " ");
    }
    message = String(message || response.statusText || "no details").replace(/\s+/g, " ").trim();
    if (message.length > MAX_ERROR_CHARS) message = message.slice(0, MAX_ERROR_CHARS) + "…";
    let hint = "";
    if (response.status === 401) {
      hint = " — enter the server's API key in Settings.";
      $("settings").open = true;
    } else if (response.status === 429 || response.status === 503) {
      const wait = response.headers.get("Retry-After");
      hint = wait ? ` — try again in ${wait} s.` : " — try again in a moment.";
    }
    return `Error ${response.status}: ${message}${hint}`;
  }

  // fetch with the API key; a non-2xx answer throws its one-line message.
  async function api(path, init = {}) {
    let response;
    try {
      response = await fetch(path, Object.assign({}, init, { headers: authHeaders(init.headers) }));
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new Error("Cannot reach the MedGemma Edge server — is `medgemma-edge serve` still running?");
    }
    if (!response.ok) throw new Error(await errorLine(response));
    return response;
  }

  // ---- messages on the page -----------------------------------------------------------------

  function showError(err) {
    if (err && err.name === "AbortError") return;
    $("error").textContent = err instanceof Error ? err.message : String(err);
    $("error").hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error").textContent = "";
  }

  function showNotice(notice) {
    if (!notice) return;
    $("notice").textContent = notice;
    $("notice").hidden = false;
  }

  const setImageStatus = (text) => ($("image-status").textContent = text);

  // ---- the model's name ---------------------------------------------------------------------

  // Asking and uploading wait for the model: until then the server would answer 503.
  function setReady(ready) {
    state.ready = ready;
    for (const id of ["pick-files", "pick-folder"]) $(id).disabled = !ready;
    setBusy(Boolean(state.controller));
  }

  async function loadModel() {
    let health = null;
    try {
      health = await (await fetch("/health")).json(); // needs no key
    } catch (_) {
      $("model-name").textContent = "server not reachable";
      setTimeout(loadModel, HEALTH_RETRY_MS);
      return;
    }
    if (health.status === "loading") {
      $("model-name").textContent = "loading the model…";
      setReady(false);
      setTimeout(loadModel, HEALTH_RETRY_MS);
      return;
    }
    setReady(health.status !== "error"); // "error": /v1/models below says why, in one line
    try {
      const models = await (await api("/v1/models")).json();
      const model = (models.data || [])[0] || {};
      state.modelId = model.id || health.model || null;
      showNotice(health.notice); // e.g. the demo model's warning, before the first answer
    } catch (err) {
      state.modelId = health.model || null;
      showError(err);
    }
    $("model-name").textContent = state.modelId || "unknown";
  }

  // ---- the image ----------------------------------------------------------------------------

  function describeWindow(ctWindow) {
    if (!ctWindow) return "";
    if (typeof ctWindow === "string") return ctWindow;
    if (Array.isArray(ctWindow)) {
      return ctWindow.map((r) => (Array.isArray(r) ? `${r[0]}..${r[1]}` : String(r))).join(", ") + " HU";
    }
    return ctWindow.name || ctWindow.preset || JSON.stringify(ctWindow);
  }

  function describeImage(image) {
    const parts = [image.pictures > 1 ? `${image.pictures} slices (one series)` : "1 picture"];
    if (image.window) parts.push("CT window: " + describeWindow(image.window));
    return parts.join(" · ");
  }

  async function upload(files) {
    if (!state.ready) return; // a drop while the model loads: the buttons say it is not time yet
    files = files.filter((f) => !SKIP_NAME.test(f.name) && f.size > 0);
    if (!files.length) {
      showError("That folder holds no files to upload.");
      return;
    }
    const seq = ++state.upload;
    state.files = files;
    state.study = null;
    if (kiosk.onImage) kiosk.onImage();
    clearError();
    setImageStatus(`Uploading ${files.length === 1 ? files[0].name : files.length + " files"}…`);
    const form = new FormData();
    for (const file of files) form.append("file", file, file.name);
    const ctWindow = $("window-select").value;
    if (ctWindow) form.append("window", ctWindow);
    try {
      const image = await (await api("/v1/images", { method: "POST", body: form })).json();
      if (seq !== state.upload) return;
      state.image = image;
      await showPreview(image, seq);
      watchEncoding(image, seq);
    } catch (err) {
      if (seq !== state.upload) return;
      setImageStatus(state.image ? "Kept the previous image." : "No image yet.");
      showError(err);
    }
  }

  async function showPreview(image, seq) {
    // fetched (not <img src>) so the API key travels with it
    const blob = await (await api(image.preview)).blob();
    if (seq !== state.upload) return;
    showPreviewBlob(blob, describeImage(image));
  }

  function showPreviewBlob(blob, caption) {
    if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
    state.previewUrl = URL.createObjectURL(blob);
    const img = $("preview-img");
    img.alt = "What the model sees: " + caption;
    img.src = state.previewUrl;
    $("preview-caption").textContent = "What the model sees: " + caption;
    $("preview").hidden = false;
    $("clear-image").hidden = false;
  }

  // The server encodes the image while the user types; say when it is ready.
  async function watchEncoding(image, seq) {
    let status = image.status;
    while (status === "encoding" && seq === state.upload) {
      setImageStatus("Preparing the image for the model… you can type your question.");
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
      if (seq !== state.upload) return;
      try {
        const info = await (await api("/v1/images/" + encodeURIComponent(image.id))).json();
        status = info.status;
        if (status === "error") showError("The image could not be prepared: " + (info.error || "unknown error"));
      } catch (err) {
        showError(err);
        return;
      }
    }
    if (seq !== state.upload) return;
    setImageStatus(status === "error" ? "The image could not be prepared." : "Image ready — ask your question.");
  }

  function clearImage() {
    state.upload++;
    state.image = null;
    state.study = null;
    if (kiosk.onImage) kiosk.onImage();
    state.files = [];
    if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
    state.previewUrl = null;
    $("preview-img").removeAttribute("src");
    $("preview").hidden = true;
    $("clear-image").hidden = true;
    $("file-input").value = "";
    $("folder-input").value = "";
    setImageStatus("No image yet.");
    $("pick-files").focus();
  }

  // A dropped folder arrives as a directory entry; read every file beneath it.
  async function filesFromEntry(entry) {
    if (entry.isFile) return [await new Promise((resolve, reject) => entry.file(resolve, reject))];
    const reader = entry.createReader();
    const files = [];
    for (;;) {
      const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
      if (!batch.length) return files; // readEntries answers in batches of ~100 until empty
      for (const child of batch) files.push(...(await filesFromEntry(child)));
    }
  }

  async function droppedFiles(dataTransfer) {
    const entries = Array.from(dataTransfer.items || [])
      .map((item) => (item.webkitGetAsEntry ? item.webkitGetAsEntry() : null))
      .filter(Boolean);
    if (!entries.length) return Array.from(dataTransfer.files);
    const files = [];
    for (const entry of entries) files.push(...(await filesFromEntry(entry)));
    return files;
  }

  // ---- the question and the streamed answer -------------------------------------------------

  // Reads an SSE body, calling onEvent(JSON) per `data:` line, until `data: [DONE]`.
  async function readEvents(body, onEvent) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      const lines = buffer.split(/\r?\n/);
      buffer = done ? "" : lines.pop(); // a line cut between two reads waits for its end
      for (const line of lines) {
        if (!line.startsWith("data:")) continue; // blank separators, comments, keep-alives
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
      if (done) throw new Error("The answer stopped before it was finished (the connection closed).");
    }
  }

  function describeStats(result) {
    const parts = [];
    const usage = result.usage || {};
    const stats = result.stats || {};
    const tokens = usage.completion_tokens != null ? usage.completion_tokens : result.pieces;
    parts.push(`${tokens} tokens`);
    const ttft = stats.ttft_s;
    if (ttft != null) parts.push("first word after " + (ttft < 1 ? `${Math.round(ttft * 1000)} ms` : `${ttft.toFixed(1)} s`));
    if (stats.decode_tok_s != null) parts.push(`${stats.decode_tok_s.toFixed(1)} tokens/s`);
    if (result.finish === "length") parts.push("cut off at the length limit (raise it in Settings)");
    if (result.finish === "repetition") parts.push("stopped: the answer was repeating itself");
    return parts.join(" · ");
  }

  function setBusy(busy) {
    $("send").disabled = busy || !state.ready;
    $("stop").disabled = !busy;
    $("answer").setAttribute("aria-busy", String(busy));
    $("send").textContent = busy ? "Answering…" : "Send";
  }

  async function ask(question) {
    const content = [];
    const url = state.study ? state.study.url : state.image && state.image.url;
    if (url) content.push({ type: "image_url", image_url: { url } });
    content.push({ type: "text", text: question });
    const maxTokens = parseInt($("max-tokens").value, 10);
    const request = {
      messages: [{ role: "user", content }],
      stream: true,
      stream_options: { include_usage: true },
    };
    if (state.modelId) request.model = state.modelId;
    if (maxTokens > 0) request.max_tokens = maxTokens;

    clearError();
    const answer = $("answer");
    answer.textContent = "";
    $("stats").textContent = "";
    $("asked").textContent = "Q: " + question;
    $("asked").hidden = false;
    state.controller = new AbortController();
    setBusy(true);
    answer.scrollIntoView({ block: "nearest" }); // on a phone the answer is below the fold
    const result = { pieces: 0, finish: null, usage: null, stats: null, id: null };
    const study = state.study;
    if (kiosk.onAsk) kiosk.onAsk();
    try {
      const response = await api("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(request),
        signal: state.controller.signal,
      });
      await readEvents(response.body, (chunk) => {
        if (chunk.error) throw new Error("Error: " + (chunk.error.message || "the answer failed"));
        result.id = chunk.id || result.id;
        for (const choice of chunk.choices || []) {
          const text = (choice.delta || {}).content;
          if (text) {
            progress.hide();
            answer.append(text); // a text node: model output is never parsed as HTML
            result.pieces++;
          }
          if (choice.finish_reason) result.finish = choice.finish_reason;
        }
        if (chunk.usage) result.usage = chunk.usage;
        const extra = chunk.medgemma_edge;
        if (extra) {
          showNotice(extra.notice);
          if (extra.stats) result.stats = extra.stats;
          if (extra.finish_reason) result.finish = extra.finish_reason; // "repetition" beside OpenAI's "length"
          if (extra.progress) progress.show(extra.progress); // images encoded, prompt read: before the answer
        }
      });
      $("stats").textContent = describeStats(result);
      if (study && result.id && kiosk.onAnswer) kiosk.onAnswer(result.id);
    } catch (err) {
      if (err.name === "AbortError") {
        $("stats").textContent = "Stopped.";
      } else {
        showError(err);
      }
    } finally {
      progress.hide();
      state.controller = null;
      setBusy(false);
    }
  }

  // ---- wiring -------------------------------------------------------------------------------

  function init() {
    const key = $("api-key");
    key.value = sessionStorage.getItem(KEY_STORE) || "";
    key.addEventListener("input", () => {
      if (key.value.trim()) sessionStorage.setItem(KEY_STORE, key.value.trim());
      else sessionStorage.removeItem(KEY_STORE);
    });
    key.addEventListener("change", () => {
      clearError();
      loadModel();
    });
    $("settings-form").addEventListener("submit", (event) => event.preventDefault()); // Enter: stay

    $("pick-files").addEventListener("click", () => $("file-input").click());
    $("pick-folder").addEventListener("click", () => $("folder-input").click());
    for (const id of ["file-input", "folder-input"]) {
      $(id).addEventListener("change", (event) => {
        const files = Array.from(event.target.files || []);
        if (files.length) upload(files);
      });
    }
    $("window-select").addEventListener("change", () => {
      if (state.files.length) upload(state.files); // show the same files in the new window
    });
    $("clear-image").addEventListener("click", clearImage);

    const drop = $("drop");
    drop.addEventListener("dragover", (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", async (event) => {
      event.preventDefault();
      drop.classList.remove("over");
      try {
        const files = await droppedFiles(event.dataTransfer);
        if (files.length) upload(files);
      } catch (err) {
        showError("Could not read the dropped files: " + err.message);
      }
    });
    // A file dropped beside the drop zone must not make the browser leave the page.
    window.addEventListener("dragover", (event) => event.preventDefault());
    window.addEventListener("drop", (event) => event.preventDefault());

    const question = $("question");
    $("ask-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const text = question.value.trim();
      if (text && state.ready && !state.controller) ask(text);
    });
    question.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        $("ask-form").requestSubmit();
      }
    });
    $("stop").addEventListener("click", () => state.controller && state.controller.abort());

    loadModel();
  }

  // What worklist.js uses (loaded after this file).
  const kiosk = { api, state, showError, clearError, setImageStatus, showPreviewBlob, clearImage,
    onImage: null, onAsk: null, onAnswer: null };
  window.MedGemmaKiosk = kiosk;

  init();
})();
