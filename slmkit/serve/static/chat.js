// The slmkit chat page. It speaks only the server's OpenAI-compatible API (/v1/models, streaming
// /v1/chat/completions), so it works the same against any server with that API. Model and user text is
// only ever put into the page as text nodes: nothing the model or the user writes is parsed as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const ui = {
    messages: $("messages"), prompt: $("prompt"), send: $("send"), stop: $("stop"), model: $("model"),
    newChat: $("new-chat"), temperature: $("temperature"), maxTokens: $("max-tokens"), apiKey: $("api-key"),
    composer: $("composer"),
  };
  const SAVED = { temperature: ui.temperature, maxTokens: ui.maxTokens, apiKey: ui.apiKey };

  let history = [];      // the conversation sent with each request: [{role, content}]
  let modelId = null;    // from /v1/models
  let controller = null; // AbortController of the request in flight, if any

  // localStorage can be unavailable (privacy modes, file: origins): the settings then last for the page only
  const store = {
    get(key) { try { return localStorage.getItem("slmkit.chat." + key); } catch { return null; } },
    set(key, value) { try { localStorage.setItem("slmkit.chat." + key, value); } catch { /* page-only */ } },
  };

  function headers(json) {
    const h = json ? { "Content-Type": "application/json" } : {};
    const key = ui.apiKey.value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  class ServerError extends Error {}

  async function errorMessage(res) {
    // the server says {"error": {"message": ...}}; anything else (say, a proxy's HTML page) is named by its status
    try {
      const body = await res.json();
      if (body && body.error && body.error.message) return String(body.error.message);
    } catch { /* not JSON */ }
    return `HTTP ${res.status} ${res.statusText}`.trim();
  }

  function nearBottom() {
    const m = ui.messages;
    return m.scrollHeight - m.scrollTop - m.clientHeight < 48;
  }

  function keepInView(wasNearBottom) {
    if (wasNearBottom) ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  // A turn on screen: <div class="msg ROLE"><span class="role">…</span><div class="text">…</div></div>
  function bubble(role, label, text) {
    const stick = nearBottom();
    const div = document.createElement("div");
    div.className = "msg " + role;
    const name = document.createElement("span");
    name.className = "role";
    name.textContent = label;
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    div.append(name, body);
    ui.messages.append(div);
    keepInView(stick);
    return div;
  }

  function note(div, text) {
    const span = document.createElement("span");
    span.className = "note";
    span.textContent = text;
    div.append(span);
  }

  function showError(text) {
    bubble("error", "error", text).setAttribute("role", "alert");
  }

  function setBusy(busy) {
    ui.send.disabled = busy;
    ui.stop.disabled = !busy;
    ui.messages.setAttribute("aria-busy", String(busy));
  }

  async function loadModel(quiet) {
    try {
      const res = await fetch("v1/models", { headers: headers(false) });
      if (!res.ok) {
        ui.model.textContent = res.status === 401 ? "(needs an API key)" : "(unavailable)";
        if (!quiet) {
          const hint = res.status === 401 ? " (enter the server's API key above)" : "";
          showError((await errorMessage(res)) + hint);
        }
        return;
      }
      const body = await res.json();
      modelId = body.data && body.data.length ? String(body.data[0].id) : null;
      ui.model.textContent = modelId ?? "(none)";
      if (modelId) document.title = modelId + " · slmkit chat";
    } catch (e) {
      ui.model.textContent = "(unavailable)";
      if (!quiet) showError("Cannot reach the server: " + e.message);
    }
  }

  // Yields the data of each server-sent event. A read can end anywhere (mid-line, mid-UTF-8 character), so
  // bytes are decoded in streaming mode and only complete lines are parsed; the rest waits for the next read.
  async function* sseData(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let data = null;
    try {
      for (;;) {
        const { value, done } = await reader.read();
        buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
        const lines = buffer.split(/\r\n|\r|\n/);
        buffer = done ? "" : lines.pop();
        for (const line of lines) {
          if (line === "") {
            if (data !== null) yield data;
            data = null;
          } else if (line.startsWith("data:")) {
            const field = line.slice(line.startsWith("data: ") ? 6 : 5);
            data = data === null ? field : data + "\n" + field;
          } // other fields (event:, id:, retry:) and ":" comments carry nothing this page uses
        }
        if (done) {
          if (data !== null) yield data;
          return;
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  function number(input, parse) {
    const n = parse(input.value);
    return Number.isFinite(n) ? n : undefined; // left out: the server's default applies
  }

  async function send() {
    const text = ui.prompt.value;
    if (controller || !text.trim()) return;
    const mine = new AbortController();
    controller = mine;
    setBusy(true);
    if (modelId === null) await loadModel(true); // the chat request below reports any error itself

    const convo = history; // "New chat" replaces the array; a reply arriving after that is dropped
    convo.push({ role: "user", content: text });
    ui.prompt.value = "";
    autosize();
    const userDiv = bubble("user", "you", text);
    const reply = bubble("assistant", modelId ?? "assistant", "");
    reply.classList.add("pending");
    const textNode = reply.querySelector(".text").appendChild(document.createTextNode(""));

    let content = "";
    let finish = null;
    let failure = null;
    let aborted = false;
    try {
      const res = await fetch("v1/chat/completions", {
        method: "POST",
        headers: headers(true),
        signal: mine.signal,
        body: JSON.stringify({
          model: modelId ?? undefined,
          messages: convo,
          max_tokens: number(ui.maxTokens, (v) => parseInt(v, 10)),
          temperature: number(ui.temperature, parseFloat),
          stream: true,
        }),
      });
      if (!res.ok) throw new ServerError(await errorMessage(res));
      for await (const data of sseData(res.body)) {
        // events already read when Stop was pressed are dropped: the reply ends where the user saw it end
        if (mine.signal.aborted) throw new DOMException("stopped", "AbortError");
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ServerError(chunk.error.message || "the server reported an error");
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        const piece = choice.delta && choice.delta.content;
        if (piece && convo === history) {
          const stick = nearBottom();
          textNode.appendData(piece);
          content += piece;
          keepInView(stick);
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    } catch (e) {
      if (e.name === "AbortError") aborted = true;
      else failure = e instanceof ServerError ? e.message
        : e instanceof SyntaxError ? "The server sent a malformed event: " + e.message
        : "Cannot reach the server: " + e.message;
    }

    if (controller === mine) {
      controller = null;
      setBusy(false);
    }
    if (convo !== history) return;
    reply.classList.remove("pending");
    if ((aborted || failure) && content === "") {
      // nothing came back: take the turn back and give the text back to edit or resend
      convo.pop();
      userDiv.remove();
      reply.remove();
      if (!ui.prompt.value) {
        ui.prompt.value = text;
        autosize();
      }
    } else {
      convo.push({ role: "assistant", content }); // a stopped reply stays in the conversation as far as it got
      if (aborted) note(reply, "stopped");
      else if (failure) note(reply, "interrupted");
      else if (finish === "length") note(reply, "reached max tokens");
      else if (content === "") note(reply, "empty reply");
    }
    if (failure) showError(failure);
    ui.prompt.focus();
  }

  function stop() {
    if (controller) controller.abort();
  }

  function newChat() {
    stop();
    controller = null;
    setBusy(false);
    history = [];
    ui.messages.replaceChildren();
    ui.prompt.focus();
  }

  function autosize() {
    ui.prompt.style.height = "auto";
    ui.prompt.style.height = ui.prompt.scrollHeight + 2 + "px";
  }

  for (const [key, input] of Object.entries(SAVED)) {
    const saved = store.get(key);
    if (saved !== null) input.value = saved;
    input.addEventListener("change", () => store.set(key, input.value.trim()));
  }
  ui.apiKey.addEventListener("change", () => loadModel(false));
  ui.composer.addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  ui.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  ui.prompt.addEventListener("input", autosize);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && controller) stop();
  });
  ui.stop.addEventListener("click", stop);
  ui.newChat.addEventListener("click", newChat);
  loadModel(false);
})();
