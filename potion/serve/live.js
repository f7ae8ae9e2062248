"use strict";
// The live page: the explain page's script above draws; this part asks potion serve for what to draw.
const LIVE = DATA.live;
const DEBOUNCE_MS = 250, POLL_MS = 3000;  // a training may start (or resume) while the page is open
let apiKey = sessionStorage.getItem("potion-api-key") || "";
let explaining = null, typing = null, generating = null;

function setStatus(text, isError = false) {
  $("live-status").textContent = text;
  $("live-status").classList.toggle("error", isError);
}
function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey) h.Authorization = `Bearer ${apiKey}`;
  return h;
}
async function failure(response) {  // the server's one-line message; a 401 opens the key box
  let message = `${response.status} ${response.statusText}`;
  try { message = (await response.json()).error.message; } catch (_) { /* not JSON: keep the status line */ }
  if (response.status === 401) $("key-label").hidden = false;
  return message;
}

async function explainPrompt(token = -1) {
  const prompt = $("prompt").value;
  if (explaining) explaining.abort();  // a newer prompt replaces the one in flight
  if (!prompt) { setStatus("Type a prompt to see its next token and attention."); return; }
  const mine = explaining = new AbortController();
  setStatus("explaining…");
  try {
    const r = await fetch("/api/explain", { method: "POST", headers: headers(), body: JSON.stringify({ prompt, token }), signal: mine.signal });
    if (!r.ok) { if (mine === explaining) setStatus(await failure(r), true); return; }
    const x = await r.json();
    if (mine !== explaining) return;
    $("explanation").hidden = false;
    show(x);
    $("title").textContent = `potion serve: ${LIVE.model}`;
    const top = x.prediction[0];
    setStatus(`${x.tokens.length} tokens; after token ${x.focus} the model expects '${top.label}' (${fmt(top.probability)})`);
  } catch (e) {
    if (e.name !== "AbortError") setStatus(String(e), true);
  } finally {
    if (explaining === mine) explaining = null;
  }
}

async function* sseData(body) {  // the data of each server-sent event, as text
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) if (line.startsWith("data: ")) yield line.slice(6);
    }
  }
}

async function generate() {
  if (generating) { generating.abort(); return; }  // the button reads Stop while it streams
  const prompt = $("prompt").value, out = $("generated"), text = el("span", { id: "generated-text" });
  const mine = generating = new AbortController();
  $("generate").textContent = "Stop";
  $("explain-generated").hidden = true;
  out.hidden = false;
  out.replaceChildren(el("span", { class: "from-prompt" }, prompt), text);
  const body = { model: LIVE.model, prompt, max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value), stream: true };
  try {
    const r = await fetch("/v1/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal: mine.signal });
    if (!r.ok) { setStatus(await failure(r), true); return; }
    setStatus("generating…");
    let finish = null;
    for await (const data of sseData(r.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) { setStatus(chunk.error.message, true); return; }
      if (chunk.warnings) setStatus(chunk.warnings.join(" "));
      for (const c of chunk.choices) { text.append(c.text); finish = c.finish_reason || finish; }
    }
    setStatus(finish === "length" ? "stopped at max tokens" : "the model ended its text");
  } catch (e) {
    setStatus(e.name === "AbortError" ? "stopped" : String(e), e.name !== "AbortError");
  } finally {
    generating = null;
    $("generate").textContent = "Generate";
    $("explain-generated").hidden = !text.textContent;
  }
}

// The chat panel: the conversation is kept here and sent whole with each message, as any OpenAI client does.
let conversation = [], replying = null;
function chatStatus(text, isError = false) {
  $("chat-status").textContent = text;
  $("chat-status").classList.toggle("error", isError);
}
function turnNode(role, text) {
  const node = el("div", { class: `turn ${role}` }, el("span", { class: "role" }, role), el("span", { class: "content" }, text));
  $("chat-log").append(node);
  return node.querySelector(".content");
}
function chatMessages() {
  const system = $("chat-system").value.trim();
  return system ? [{ role: "system", content: system }, ...conversation] : conversation;
}

async function sendMessage() {
  if (replying) { replying.abort(); return; }  // the button reads Stop while a reply streams
  const content = $("chat-input").value.trim();
  if (!content) return;
  const mine = replying = new AbortController();
  const userNode = turnNode("user", content).parentNode, reply = turnNode("assistant", "");
  conversation.push({ role: "user", content });
  $("chat-input").value = "";
  $("chat-send").textContent = "Stop";
  const body = { model: LIVE.model, messages: chatMessages(), max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value), stream: true };
  let finish = null;
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal: mine.signal });
    if (!r.ok) throw new Error(await failure(r));
    chatStatus("replying…");
    for await (const data of sseData(r.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const c of chunk.choices) { reply.append(c.delta.content || ""); finish = c.finish_reason || finish; }
    }
    chatStatus(finish === "length" ? "the reply stopped at max tokens" : "");
  } catch (e) {
    if (e.name === "AbortError") { chatStatus("stopped"); finish = "stopped"; }
    else chatStatus(e.message, true);
  } finally {
    replying = null;
    $("chat-send").textContent = "Send";
    if (finish === null) {  // no reply: the message goes back to the box, the conversation is as it was
      conversation.pop();
      userNode.remove();
      reply.parentNode.remove();
      $("chat-input").value = content;
    } else {
      conversation.push({ role: "assistant", content: reply.textContent });  // a stopped reply is kept as far as it got
    }
    $("chat-explain").hidden = !conversation.length;
  }
}

async function explainConversation() {  // the conversation as the template renders it, in the prompt box above
  try {
    const tokenized = await fetch("/tokenize", { method: "POST", headers: headers(), body: JSON.stringify({ messages: chatMessages(), add_generation_prompt: false }) });
    if (!tokenized.ok) throw new Error(await failure(tokenized));
    const { tokens } = await tokenized.json();
    const text = await fetch("/detokenize", { method: "POST", headers: headers(), body: JSON.stringify({ tokens }) });
    if (!text.ok) throw new Error(await failure(text));
    $("prompt").value = (await text.json()).prompt;
    $("prompt").scrollIntoView();
    explainPrompt();
  } catch (e) {
    chatStatus(e.message, true);
  }
}

function resetChat() {
  if (replying) replying.abort();
  conversation = [];
  $("chat-log").replaceChildren();
  $("chat-explain").hidden = true;
  chatStatus("");
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  return node;
}
const SERIES = [["train", "train (batch)", "#bbb", 1], ["train_eval", "train (eval)", "#1f77b4", 2], ["val", "validation", "#ff7f0e", 2]];
function drawLosses(losses, pid) {
  const last = losses.val.at(-1), box = $("loss-curve");
  const caption = el("div", { id: "loss-caption", class: "note" }, (pid ? `training now (process ${pid})` : "not training now") +
    (last ? `; step ${last[0]}: validation loss ${fmt(last[1], 4)}` : ""));
  const points = SERIES.flatMap(([key]) => losses[key]);
  if (!points.length) { box.replaceChildren(caption); return; }
  const W = 640, H = 220, L = 56, R = 12, T = 10, B = 28;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(x0 + 1, ...xs), y0 = Math.min(...ys), y1 = Math.max(y0 + 1e-6, ...ys);
  const X = (x) => (L + (x - x0) / (x1 - x0) * (W - L - R)).toFixed(1), Y = (y) => (H - B - (y - y0) / (y1 - y0) * (H - T - B)).toFixed(1);
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", "aria-label": "loss by step" });
  chart.append(svg("polyline", { points: `${L},${T} ${L},${H - B} ${W - R},${H - B}`, fill: "none", stroke: "#888" }),
    svg("text", { x: L - 4, y: T + 8, "text-anchor": "end", "font-size": 11 }, fmt(y1, 2)),
    svg("text", { x: L - 4, y: H - B, "text-anchor": "end", "font-size": 11 }, fmt(y0, 2)),
    svg("text", { x: L, y: H - 8, "font-size": 11 }, `step ${x0}`),
    svg("text", { x: W - R, y: H - 8, "text-anchor": "end", "font-size": 11 }, `step ${x1}`));
  for (const [key, , color, width] of SERIES) {
    if (losses[key].length) chart.append(svg("polyline", { points: losses[key].map(([s, v]) => `${X(s)},${Y(v)}`).join(" "), fill: "none", stroke: color, "stroke-width": width, "data-series": key }));
  }
  const legend = el("div", { class: "legend note" }, ...SERIES.filter(([key]) => losses[key].length).map(([, name, color]) =>
    el("span", {}, Object.assign(el("i"), { style: `background:${color}` }), name)));
  box.replaceChildren(caption, chart, legend);
}

async function pollTraining() {
  try {
    const r = await fetch("/api/training", { headers: headers() });
    if (r.ok) {
      const t = await r.json();
      if (t.losses || t.probes.length) {
        $("training-section").hidden = false;
        if (t.losses) drawLosses(t.losses, t.training);
        setProbes(t.probes);
      }
    }
  } catch (_) { /* the server has gone: try again later */ }
  setTimeout(pollTraining, POLL_MS);
}

$("title").textContent = `potion serve: ${LIVE.model}`;
$("summary").textContent = "Type below: the page asks the model being served, which computes exactly what potion explain does.";
$("explanation").hidden = true;
$("prompt").addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(() => explainPrompt(), DEBOUNCE_MS); });
$("generate").addEventListener("click", generate);
$("explain-generated").addEventListener("click", () => { $("prompt").value = $("generated").textContent; explainPrompt(); });
$("api-key").addEventListener("change", () => {
  apiKey = $("api-key").value;
  sessionStorage.setItem("potion-api-key", apiKey);
  explainPrompt();
});
onChoose = (i) => explainPrompt(i);  // a click on a token asks for that token's explanation
if (LIVE.needs_key && !apiKey) $("key-label").hidden = false;
$("max-tokens").max = LIVE.max_tokens;
$("prompt").value = LIVE.prompt;
explainPrompt();
if (LIVE.has_run) pollTraining();
$("chat-panel").hidden = !LIVE.chat;
$("chat-send").addEventListener("click", sendMessage);
$("chat-reset").addEventListener("click", resetChat);
$("chat-explain").addEventListener("click", explainConversation);
$("chat-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); sendMessage(); }
});
