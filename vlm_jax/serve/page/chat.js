// The chat page: keeps the conversation, sends it to /v1/chat/completions with stream: true, and shows the
// answer as its server-sent events arrive. Images (picked or pasted) travel as data: URLs in image_url parts.
"use strict";
const state = { model: null, history: [], pending: [] };
const $ = (id) => document.getElementById(id);

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function attach(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) continue;
    const url = await readAsDataURL(file);
    state.pending.push(url);
    const img = document.createElement("img");
    img.src = url;
    $("attachments").appendChild(img);
  }
}

function bubble(role, text, images) {
  const div = document.createElement("div");
  div.className = "message " + role;
  for (const url of images || []) {
    const img = document.createElement("img");
    img.src = url;
    div.appendChild(img);
  }
  const span = document.createElement("span");
  span.className = "text";
  span.textContent = text;
  div.appendChild(span);
  $("messages").appendChild(div);
  div.scrollIntoView();
  return div;
}

// Reads an SSE response body, calling onData(parsed JSON) for each `data:` event until [DONE].
async function readEvents(response, onData) {
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
        onData(JSON.parse(data));
      }
    }
  }
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value;
  if (!text && !state.pending.length) return;
  const images = state.pending;
  const content = images.map((url) => ({ type: "image_url", image_url: { url } }));
  if (text) content.push({ type: "text", text });
  state.history.push({ role: "user", content });
  bubble("user", text, images);
  state.pending = [];
  $("attachments").replaceChildren();
  $("prompt").value = "";
  $("send").disabled = true;
  const maxTokens = parseInt($("max-tokens").value, 10);
  const limit = maxTokens > 0 ? { max_tokens: maxTokens } : {};
  const answer = bubble("assistant", "");
  const span = answer.querySelector(".text");
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: state.model, messages: state.history, stream: true, ...limit }),
    });
    if (!response.ok) throw new Error((await response.json()).error.message);
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices) {
        if (choice.delta.content) span.textContent += choice.delta.content;
        if (choice.finish_reason) answer.dataset.finishReason = choice.finish_reason;
      }
    });
    state.history.push({ role: "assistant", content: span.textContent });
  } catch (err) {
    answer.className = "message error";
    span.textContent = String(err.message || err);
    state.history.pop();  // the question goes unanswered: send it again
  } finally {
    answer.dataset.done = "true";
    $("send").disabled = false;
  }
}

async function start() {
  try {
    const models = await (await fetch("/v1/models")).json();
    state.model = models.data[0].id;
    $("model").textContent = state.model;
  } catch (err) {
    $("model").textContent = "no model: " + err;
  }
  $("composer").addEventListener("submit", send);
  $("image-input").addEventListener("change", (e) => { attach([...e.target.files]); e.target.value = ""; });
  document.addEventListener("paste", (e) => {
    const files = [...e.clipboardData.items].filter((i) => i.kind === "file").map((i) => i.getAsFile());
    if (files.length) attach(files);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("clear").addEventListener("click", () => {
    state.history = [];
    $("messages").replaceChildren();
  });
}
start();
