// The worklist, on a server with a DICOM node (`serve --dicom-port`): the studies the PACS sent,
// each with its state (receiving, queued, preparing i of n, ready, failed: why); pick one to see
// what the model sees of it and ask about it. After an answer about a study, "Send draft to PACS"
// stores it as an unverified draft report (POST /v1/results) and shows how the sending goes.
// Uses kiosk.js's helpers (window.MedGemmaKiosk); every value is put on the page as text.
"use strict";

(() => {
  const kiosk = window.MedGemmaKiosk;
  const $ = (id) => document.getElementById(id);
  const LIST_MS = 2000; // how often the worklist is read again
  const RESULT_MS = 1000; // how often a draft's state is asked while it is being sent
  const RESULT_TRIES = 120; // then the page stops asking (the node keeps retrying)
  const state = { studies: [], picked: null, completion: null, draftSeq: 0 };

  function title(study) {
    // Patient values come only with the server's API key; without, the study is named by its UID's end.
    const who = study.patient_name ? study.patient_name.replace(/\^+/g, " ").trim() : "";
    const parts = [who || `Study …${study.uid.slice(-10)}`];
    if (study.patient_id) parts.push(`ID ${study.patient_id}`);
    if (study.study_date) parts.push(study.study_date);
    if (study.study_description) parts.push(study.study_description);
    return parts.join(" · ");
  }

  function details(study) {
    const modalities = (study.modalities || []).join("/") || "DICOM";
    const count = `${study.instances} instance${study.instances === 1 ? "" : "s"}`;
    return `${modalities} · ${count} · ${study.status}`;
  }

  function render() {
    const list = $("studies");
    list.replaceChildren();
    for (const study of state.studies) {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "button study";
      button.dataset.uid = study.uid;
      button.dataset.state = study.state;
      button.setAttribute("aria-pressed", String(study.uid === state.picked));
      const name = document.createElement("span");
      name.className = "study-name";
      name.textContent = title(study);
      const info = document.createElement("span");
      info.className = "study-state";
      info.textContent = details(study);
      button.append(name, info);
      button.addEventListener("click", () => pick(study.uid));
      item.append(button);
      list.append(item);
    }
    const n = state.studies.length;
    $("worklist-status").textContent = n ? `${n} stud${n === 1 ? "y" : "ies"} · pick one, then ask.`
      : "No studies yet: they appear here when the PACS or a modality sends them.";
    const picked = state.studies.find((s) => s.uid === state.picked);
    if (picked && kiosk.state.study) kiosk.setImageStatus(`Study: ${details(picked)}`);
  }

  async function refresh() {
    try {
      const body = await (await kiosk.api("/v1/studies")).json();
      state.studies = body.data || [];
      render();
    } catch (err) {
      $("worklist-status").textContent = err.message;
    } finally {
      setTimeout(refresh, LIST_MS);
    }
  }

  async function pick(uid) {
    const study = state.studies.find((s) => s.uid === uid);
    if (!study) return;
    kiosk.clearImage(); // an upload in flight no longer counts
    kiosk.clearError();
    state.picked = uid;
    kiosk.state.study = { url: study.url, caption: title(study) };
    render();
    kiosk.setImageStatus(`Study: ${details(study)}`);
    try {
      const blob = await (await kiosk.api(study.preview)).blob();
      if (state.picked !== uid) return;
      kiosk.showPreviewBlob(blob, `${title(study)} (${(study.modalities || []).join("/")})`);
    } catch (err) {
      if (state.picked === uid) kiosk.showError(err);
    }
    $("question").focus();
  }

  // kiosk.js calls these: a new image drops the picked study; a new question hides the last draft.
  function imageChanged() {
    state.picked = null;
    render();
  }

  function asking() {
    state.completion = null;
    state.draftSeq++;
    $("draft").hidden = true;
  }

  function answered(completionId) {
    state.completion = completionId;
    $("send-draft").disabled = false;
    $("draft-status").textContent = "An unverified AI draft: sent only if you press the button.";
    $("draft").hidden = false;
  }

  function describeDraft(result) {
    const says = {
      queued: "Draft queued for the PACS…",
      sending: "Sending the draft to the PACS…",
      sent: "Draft stored in the PACS, marked UNVERIFIED (AI draft, not for diagnosis).",
      failed: "The draft could not be stored: " + (result.error || "unknown error"),
    };
    const retry = result.state === "queued" && result.attempts ? ` (attempt ${result.attempts + 1})` : "";
    return (says[result.state] || result.state) + retry;
  }

  async function sendDraft() {
    if (!state.completion) return;
    const seq = ++state.draftSeq;
    $("send-draft").disabled = true;
    $("draft-status").textContent = "Sending…";
    try {
      const response = await kiosk.api("/v1/results", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ completion_id: state.completion }),
      });
      let result = await response.json();
      for (let i = 0; i < RESULT_TRIES && seq === state.draftSeq; i++) {
        $("draft-status").textContent = describeDraft(result);
        $("draft-status").dataset.state = result.state;
        if (result.state === "sent" || result.state === "failed") return;
        await new Promise((resolve) => setTimeout(resolve, RESULT_MS));
        result = await (await kiosk.api("/v1/results/" + encodeURIComponent(result.id))).json();
      }
    } catch (err) {
      if (seq !== state.draftSeq) return;
      $("draft-status").textContent = err.message;
      $("send-draft").disabled = false;
    }
  }

  async function start() {
    let health = null;
    try {
      health = await (await fetch("/health")).json(); // needs no key
    } catch (_) {
      setTimeout(start, LIST_MS);
      return;
    }
    if (!health.node) return; // no DICOM node: the page is the upload page alone
    $("worklist").hidden = false;
    kiosk.onImage = imageChanged;
    kiosk.onAsk = asking;
    kiosk.onAnswer = answered;
    $("send-draft").addEventListener("click", sendDraft);
    refresh();
  }

  start();
})();
