"""The page of `GET /` of the search service: pick or drop a photo, see the ranked gallery.

Self-contained (inline CSS and script, no external resources): it posts the file as the raw
body to /search and draws each match with its picture (GET /image), label and score. A
second form adds images to an identity (POST /identities?label=L, multipart) or removes one
(DELETE /identities/L). When the service has a token, the page asks for it and sends it as
`Authorization: Bearer` on every call (pictures are fetched with it, then shown).
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ctl_jax search</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
  h1 { font-size: 1.3em; margin: 0 0 .3em; }
  #info { color: #666; font-size: .9em; margin-bottom: 1em; }
  #drop { display: block; border: 2px dashed #888; border-radius: 8px; padding: 1.2em;
          text-align: center; background: #fff; cursor: pointer; }
  #drop.over { border-color: #2a7; background: #efe; }
  #query { margin-top: 1em; display: none; }
  #query img { max-height: 160px; border: 3px solid #36c; }
  #status { margin: .8em 0; min-height: 1.2em; }
  #status.error { color: #b00; }
  #results { display: flex; flex-wrap: wrap; gap: 12px; }
  .match { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 6px;
           width: 120px; text-align: center; font-size: .85em; }
  .match img { max-width: 108px; max-height: 160px; display: block; margin: 0 auto 4px; }
  .match .noimg { height: 80px; line-height: 80px; color: #999; }
  .rank { color: #888; }
  .label { font-weight: 600; overflow-wrap: anywhere; }
  #manage { margin-top: 1.5em; padding: .8em; background: #fff; border: 1px solid #ddd;
            border-radius: 8px; }
  #manage input[type=text] { width: 12em; }
  #manage-status.error, #token-box.error { color: #b00; }
  #token-box { display: none; margin-bottom: 1em; }
</style>
</head>
<body>
<h1>Image search</h1>
<div id="info">loading...</div>
<div id="token-box">This service needs a token:
  <input type="password" id="token" autocomplete="off"> <button id="token-set">use</button>
</div>
<label id="drop" for="file">Drop a photo here, or click to choose one
  <input type="file" id="file" accept="image/*" hidden>
</label>
<div id="query"><div>Query</div><img id="query-img" alt="query"></div>
<div id="status"></div>
<div id="results"></div>
<form id="manage" onsubmit="return false">
  <b>Identities</b>
  <label>label <input type="text" id="label" required></label>
  <input type="file" id="add-files" accept="image/*" multiple>
  <button id="add">add images</button>
  <button id="remove">remove identity</button>
  <div id="manage-status"></div>
</form>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("ctl_jax_token") || "";
const call = (url, options = {}) => {
  const headers = Object.assign({}, options.headers || {});
  if (token) headers["Authorization"] = "Bearer " + token;
  return fetch(url, Object.assign({}, options, {headers}));
};
const answer = (r) => r.json().then((body) => {
  if (r.status === 401) $("token-box").style.display = "block";
  if (!r.ok) throw new Error(body.error || `failed (${r.status})`);
  return body;
});
function refresh() {
  fetch("/health").then((r) => r.json()).then((h) => {
    $("info").textContent = `${h.index.items} ${h.index.kind} items (${h.index.method}), ` +
      `${h.model.dim}-d embeddings, images resized to ${h.model.input_size.join("x")}`;
  }).catch(() => { $("info").textContent = "service not reachable"; });
}
refresh();
$("token-set").addEventListener("click", () => {
  token = $("token").value;
  sessionStorage.setItem("ctl_jax_token", token);
  $("token-box").style.display = "none";
});

function picture(url, alt) {
  const img = document.createElement("img");
  img.alt = alt;
  if (!token) { img.src = url; return img; }
  call(url).then((r) => r.ok ? r.blob() : null)
    .then((b) => { if (b) img.src = URL.createObjectURL(b); });
  return img;
}

function show(file) {
  if (!file) return;
  $("query").style.display = "block";
  $("query-img").src = URL.createObjectURL(file);
  $("status").className = "";
  $("status").textContent = "searching...";
  $("results").replaceChildren();
  call("/search", {method: "POST", body: file,
                   headers: {"Content-Type": file.type || "application/octet-stream"}})
    .then(answer)
    .then((body) => {
      const matches = body.queries[0].matches;
      $("status").textContent = `${matches.length} best matches`;
      matches.forEach((m, i) => {
        const card = document.createElement("div");
        card.className = "match";
        if (m.image) {
          card.appendChild(picture(m.image, m.label || ""));
        } else {
          const none = document.createElement("div");
          none.className = "noimg";
          none.textContent = "no image";
          card.appendChild(none);
        }
        const label = document.createElement("div");
        label.className = "label";
        label.textContent = m.label || "(unknown)";
        const score = document.createElement("div");
        score.innerHTML = `<span class="rank">#${i + 1}</span> ${m.score.toFixed(3)}`;
        card.append(label, score);
        $("results").appendChild(card);
      });
    })
    .catch((e) => { $("status").className = "error"; $("status").textContent = e.message; });
}

function manage(request, done) {
  const label = $("label").value.trim();
  const status = $("manage-status");
  status.className = "";
  if (!label) { status.className = "error"; status.textContent = "give a label"; return; }
  status.textContent = "working...";
  request(encodeURIComponent(label)).then(answer).then((body) => {
    status.textContent = done(body) + `; the index now holds ${body.items} items`;
    refresh();
  }).catch((e) => { status.className = "error"; status.textContent = e.message; });
}
$("add").addEventListener("click", () => {
  const files = [...$("add-files").files];
  if (!files.length) {
    $("manage-status").className = "error";
    $("manage-status").textContent = "choose images to add";
    return;
  }
  const form = new FormData();
  files.forEach((f) => form.append("images", f, f.name));
  manage((label) => call(`/identities?label=${label}`, {method: "POST", body: form}),
         (body) => `added ${body.added} image(s) to ${body.label}`);
});
$("remove").addEventListener("click", () => {
  manage((label) => call(`/identities/${label}`, {method: "DELETE"}),
         (body) => `removed ${body.label}`);
});
$("file").addEventListener("change", (e) => show(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  show(e.dataTransfer.files[0]);
});
</script>
</body>
</html>
"""
