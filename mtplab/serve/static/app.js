// The chat page: keeps the conversation, streams each answer from /v1/chat/completions and marks
// which tokens a head drafted (and the model accepted) and which the model computed.
// Plain browser JavaScript, no build step. Model text only ever goes in through textContent.
// With `mtplab serve --api-key`, the page and its files load without the key; the API answers
// 401, the page asks for the key once, keeps it for this tab's session and sends it on every call.
"use strict";

const $ = (id) => document.getElementById(id);
const messages = [];        // the conversation, OpenAI-style {role, content}
let controller = null;      // AbortController of the answer being streamed
const KEY = "mtplab_api_key";

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY);
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// A 401: ask for the key (again, if the one we sent was wrong).
function askForKey() {
  const sent = sessionStorage.getItem(KEY);
  sessionStorage.removeItem(KEY);
  $("key_message").textContent = sent ? "Wrong API key: try again." : "This server needs an API key.";
  $("keyform").hidden = false;
  $("api_key").focus();
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  if (text) div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function note(div, text) {
  const span = document.createElement("span");
  span.className = "note";
  span.textContent = text;
  div.appendChild(span);
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : response.statusText;
  } catch (_) {
    return response.status + " " + response.statusText;
  }
}

async function loadModel() {
  try {
    const r = await fetch("v1/models", { headers: headers() });
    if (r.status === 401) {
      askForKey();
      $("model").textContent = "API key needed";
      return;
    }
    if (!r.ok) throw new Error(await errorMessage(r));
    $("keyform").hidden = true;
    const m = (await r.json()).data[0];
    const info = m.mtplab || {};
    $("model").textContent = `${m.id}: ${(info.parameters / 1e6).toFixed(1)}M parameters, ` +
      `${info.heads} head(s), ${info.context_length}-token context`;
    $("model").dataset.id = m.id;
    if (info.heads > 1) $("n_draft").max = info.heads - 1;
    else $("speculative").checked = false;
  } catch (e) {
    $("model").textContent = "model unavailable: " + e.message;
  }
}

function requestBody() {
  const body = {
    model: $("model").dataset.id || undefined,
    messages: messages,
    stream: true,
    temperature: Number($("temperature").value || 0),
    top_p: Number($("top_p").value || 1),
    speculative: $("speculative").checked,
  };
  if ($("n_draft").value !== "") body.n_draft = Number($("n_draft").value);
  if ($("max_tokens").value !== "") body.max_tokens = Number($("max_tokens").value);
  return body;
}

// One chunk = one forward pass: a block of tokens, each marked drafted-and-accepted or computed.
function appendBlock(div, ext, text) {
  const block = document.createElement("span");
  block.className = "block";
  const segments = ext && ext.segments ? ext.segments : [{ text: text, accepted: false }];
  for (const seg of segments) {
    if (!seg.text) continue;
    const tok = document.createElement("span");
    tok.className = seg.accepted ? "tok draft" : "tok";
    tok.textContent = seg.text;
    block.appendChild(tok);
  }
  if (block.childNodes.length) div.appendChild(block);
}

function showStats(tau, tokens, t0) {
  $("tau").textContent = tau.toFixed(2);
  $("ntokens").textContent = tokens;
  const seconds = (performance.now() - t0) / 1000;
  if (seconds > 0 && tokens > 1) $("tps").textContent = (tokens / seconds).toFixed(1);
}

async function send(text) {
  messages.push({ role: "user", content: text });
  bubble("user", text);
  const div = bubble("assistant", "");
  div.dataset.state = "streaming";
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  let answer = "", tokens = 0, t0 = null, ended = "";
  try {
    const r = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (r.status === 401) askForKey();
    if (!r.ok) throw new Error(await errorMessage(r));
    const reader = r.body.getReader();
    const utf8 = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += utf8.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {   // SSE events end with a blank line
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          const choice = chunk.choices[0];
          const piece = (choice.delta && choice.delta.content) || "";
          const ext = chunk.mtplab;
          if (ext && ext.tokens && ext.tokens.length) {
            if (t0 === null) t0 = performance.now();
            tokens += ext.tokens.length;
            showStats(ext.tau, tokens, t0);
          }
          if (piece) {
            answer += piece;
            appendBlock(div, ext, piece);
            div.scrollIntoView({ block: "end" });
          }
          if (choice.finish_reason) ended = choice.finish_reason;
        }
      }
    }
    if (ended === "length") note(div, "[token limit]");
  } catch (e) {
    if (e.name === "AbortError") {
      note(div, "[stopped]");   // aborting the fetch closes the connection; the server stops decoding
    } else {
      div.classList.add("error");
      note(div, e.message);
    }
  } finally {
    div.dataset.state = "done";
    if (answer) messages.push({ role: "assistant", content: answer });
    else messages.pop();   // nothing came back: forget the question so the turns stay paired
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
    $("prompt").focus();
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  messages.length = 0;
  $("messages").replaceChildren();
  for (const id of ["tau", "tps", "ntokens"]) $(id).textContent = "–";
});
$("keyform").addEventListener("submit", (e) => {
  e.preventDefault();
  const key = $("api_key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY, key);
  $("api_key").value = "";
  $("key_message").textContent = "";
  loadModel();   // hides the form if the key is right, asks again if not
});
loadModel();
