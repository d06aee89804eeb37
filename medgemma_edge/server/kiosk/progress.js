// The progress of a long first answer, before its first token: a bar and one line ("Encoding image 3
// of 85 — about 2 min left"), from the `medgemma_edge.progress` chunks of the stream, which kiosk.js
// hands to show(); hide() once the answer starts or ends. The event shape is in docs/server.md
// (Progress). Plain browser JavaScript, no build step, as kiosk.js.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  function timeLeft(seconds) {
    if (seconds == null) return ""; // nothing measured yet: no guess
    if (seconds < 1) return " — almost done";
    if (seconds < 90) return ` — about ${Math.round(seconds)} s left`;
    return ` — about ${Math.round(seconds / 60)} min left`;
  }

  // One line for a progress event: {stage, done, total, elapsed_s, eta_s}.
  function describe(p) {
    const left = timeLeft(p.eta_s);
    if (p.stage === "images") {
      if (p.total === 1) return (p.done ? "Encoded the image" : "Encoding the image") + left;
      if (p.done >= p.total) return `Encoded ${p.total} images`;
      return `Encoding image ${p.done + 1} of ${p.total}` + left;
    }
    if (p.stage === "prompt") {
      const percent = p.total ? Math.floor((100 * p.done) / p.total) : 100;
      return `Reading the images and the question: ${percent}%` + left;
    }
    return `Preparing: ${p.done} of ${p.total}` + left; // a stage this page does not know by name
  }

  function show(p) {
    const bar = $("progress-bar");
    bar.max = Math.max(1, p.total);
    bar.value = Math.min(p.done, bar.max);
    $("progress-text").textContent = describe(p);
    $("progress").dataset.stage = p.stage || "";
    $("progress").hidden = false;
  }

  function hide() {
    $("progress").hidden = true;
  }

  window.MedGemmaProgress = { show, hide, describe };
})();
