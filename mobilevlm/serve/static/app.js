// The chat page: keeps the conversation client-side in OpenAI message format and streams each answer over
// the same /v1/chat/completions API that other programs use (so the page needs no endpoint of its own).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, messages: [], pendingImages: [], controller: null };

function setBusy(busy) {
  document.body.dataset.state = busy ? "busy" : "idle";
  $("send").disabled = busy;
  $("stop").hidden = !busy;
}

function addBubble(kind, text, images = []) {
  const div = document.createElement("div");
  div.className = `msg ${kind}`;
  for (const src of images) {
    const img = document.createElement("img");
    img.src = src;
    img.alt = "attached image";
    div.appendChild(img);
  }
  const span = document.createElement("span");
  span.className = "text";
  span.textContent = text;
  div.appendChild(span);
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return span;
}

function showPending() {
  const box = $("pending-images");
  box.replaceChildren(...state.pendingImages.map((src) => {
    const img = document.createElement("img");
    img.src = src;
    img.alt = "image for the next question";
    return img;
  }));
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function errorMessage(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `HTTP ${response.status}`;
  }
}

// Reads the server-sent events of one streamed answer, calling onPiece for each piece of text.
async function readStream(response, onPiece) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const piece = chunk.choices.length ? chunk.choices[0].delta.content : "";
        if (piece) onPiece(piece);
      }
    }
  }
}

async function send(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question || document.body.dataset.state === "busy") return;
  const images = state.pendingImages;
  const content = [...images.map((url) => ({ type: "image_url", image_url: { url } })), { type: "text", text: question }];
  state.messages.push({ role: "user", content });
  addBubble("user", question, images);
  $("question").value = "";
  state.pendingImages = [];
  showPending();

  const answer = addBubble("assistant", "");
  let text = "";
  state.controller = new AbortController();
  setBusy(true);
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        model: state.model, messages: state.messages, stream: true,
        temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
      }),
      signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    await readStream(response, (piece) => {
      text += piece;
      answer.textContent = text.trimStart();
      answer.scrollIntoView({ block: "end" });
    });
    state.messages.push({ role: "assistant", content: text.trim() });
  } catch (err) {
    if (err.name === "AbortError" && text) {
      state.messages.push({ role: "assistant", content: text.trim() });  // keep what was said before Stop
    } else {
      // the question was not answered: take it back out of the history so that the next one is well formed
      state.messages.pop();
      answer.parentElement.remove();
      addBubble("error", err.name === "AbortError" ? "stopped" : err.message);
    }
  } finally {
    state.controller = null;
    setBusy(false);
  }
}

async function init() {
  $("composer").addEventListener("submit", send);
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.messages = [];
    state.pendingImages = [];
    showPending();
    $("messages").replaceChildren();
  });
  $("image-input").addEventListener("change", async (e) => {
    for (const file of e.target.files) state.pendingImages.push(await readAsDataURL(file));
    e.target.value = "";
    showPending();
  });
  try {
    const response = await fetch("v1/models");
    if (!response.ok) throw new Error(await errorMessage(response));
    state.model = (await response.json()).data[0].id;
    $("model-name").textContent = state.model;
    setBusy(false);
  } catch (err) {
    addBubble("error", `cannot reach the server: ${err.message}`);
    document.body.dataset.state = "error";
  }
}

init();
