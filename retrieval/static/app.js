// The page of `radalign retrieval serve`: one JSON API, every text shown with textContent (never innerHTML),
// images only from the service's own /api/thumbnail/<id>.
"use strict";

const $ = (id) => document.getElementById(id);
let INFO = null;

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

function busy(message) {
  $("progress").hidden = false;
  $("status-text").textContent = message;
  $("error").hidden = true;
  $("error").textContent = "";
}

function done(message) {
  $("progress").hidden = true;
  $("status-text").textContent = message;
}

function fail(message) {
  document.body.dataset.errors = String(Number(document.body.dataset.errors || 0) + 1);
  $("progress").hidden = true;
  $("status-text").textContent = "";
  $("error").textContent = message;
  $("error").hidden = false;
}

async function api(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (e) {
    throw new Error("the service did not answer (" + e.message + "); is `radalign retrieval serve` running?");
  }
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    let detail = body && body.detail !== undefined ? body.detail : response.statusText;
    if (typeof detail !== "string") detail = JSON.stringify(detail);
    throw new Error(response.status + " " + (body && body.reason ? body.reason + ": " : "") + detail);
  }
  return body;
}

// ---------------------------------------------------------------------------------------------------------
// Filters

function checkboxes(container, values, name) {
  clear(container);
  values.forEach((v) => {
    const label = el("label");
    const box = el("input");
    box.type = "checkbox";
    box.value = v;
    box.name = name;
    label.appendChild(box);
    label.appendChild(document.createTextNode(" " + v));
    container.appendChild(label);
  });
  container.closest("fieldset").hidden = values.length === 0;
}

function options(select, values) {
  clear(select);
  values.forEach((v) => { const o = el("option", v); o.value = v; select.appendChild(o); });
}

function checked(container) {
  return Array.from(container.querySelectorAll("input:checked")).map((b) => b.value);
}

function filters() {
  const f = {};
  for (const name of ["view", "split", "sex", "age_band"]) {
    const values = checked($("f-" + name));
    if (values.length) f[name] = values;
  }
  if ($("f-date-from").value) f.date_from = $("f-date-from").value;
  if ($("f-date-to").value) f.date_to = $("f-date-to").value;
  const present = Array.from($("f-present").selectedOptions).map((o) => o.value);
  const absent = Array.from($("f-absent").selectedOptions).map((o) => o.value);
  if (present.length) f.labels_present = present;
  if (absent.length) f.labels_absent = absent;
  return f;
}

function k() {
  const value = parseInt($("k-input").value, 10);
  return Number.isFinite(value) ? value : null;
}

// ---------------------------------------------------------------------------------------------------------
// Results

function thumbnail(dicomId) {
  const img = el("img");
  img.alt = "film " + dicomId;
  img.src = "/api/thumbnail/" + encodeURIComponent(dicomId);
  return img;
}

function excerpt(n) {
  const s = n.sections || {};
  return s.impression || s.findings || n.report || "";
}

function describeQuery(q) {
  if (q.kind === "text") return "text \u201c" + q.text + "\u201d";
  if (q.kind === "study") return "study " + q.study_id + " (patient " + q.subject_id + ")";
  if (q.kind === "image") return "uploaded " + (q.format || "image") + (q.view ? " (" + q.view + ")" : "");
  return q.kind;
}

function renderSummary(result, ms) {
  const box = $("summary");
  clear(box);
  box.appendChild(el("h2", result.neighbours.length + " similar cases for " + describeQuery(result.query)));
  const f = result.filtered || {};
  const parts = Object.keys(f).filter((key) => f[key]).map((key) => f[key] + " " + key.replace(/_/g, " "));
  if (parts.length) box.appendChild(el("p", "Left out on the way: " + parts.join(", ") + ".", "muted"));
  if (result.explanation) box.appendChild(renderExplanation(result.explanation));
  done(result.neighbours.length + " cases in " + ms + " ms");
}

function renderVote(vote) {
  const box = $("vote");
  clear(box);
  if (!vote.length) { box.appendChild(el("p", "None of these cases carries a positive label.", "muted")); return; }
  box.appendChild(el("h3", "Label vote of the similar cases"));
  const list = el("ul");
  vote.forEach((v) => list.appendChild(el("li", v.text + " (similarity-weighted " + Math.round(100 * v.weighted) + "%)")));
  box.appendChild(list);
}

function renderResults(result) {
  const box = $("results");
  clear(box);
  $("case").hidden = true;
  result.neighbours.forEach((n) => {
    const card = el("article", null, "card");
    card.tabIndex = 0;
    card.dataset.studyId = n.study_id;
    card.dataset.dicomId = n.dicom_id;
    if (n.thumbnail_url) card.appendChild(thumbnail(n.dicom_id));
    card.appendChild(el("div", "#" + n.rank + "  similarity " + n.similarity.toFixed(3), "sim"));
    card.appendChild(el("div", "study " + n.study_id + " \u00b7 " + (n.view || "?") + " \u00b7 " + (n.split || "")));
    card.appendChild(el("div", n.labels.length ? n.labels.join(", ") : "no positive label", "labels"));
    card.appendChild(el("div", excerpt(n), "excerpt"));
    const open = () => openCase(n.study_id);
    card.addEventListener("click", open);
    card.addEventListener("keydown", (e) => { if (e.key === "Enter") open(); });
    box.appendChild(card);
  });
}

function show(result, t0) {
  renderSummary(result, Math.round(performance.now() - t0));
  renderVote(result.vote);
  renderResults(result);
  document.body.dataset.answers = String(Number(document.body.dataset.answers || 0) + 1);
}

// ---------------------------------------------------------------------------------------------------------
// A case and its explanation

function maxAbs(values) { return Math.max(0, ...values.map((v) => Math.abs(Number(v)))); }

// A signed value (logit) and its bar, red raising the risk, blue lowering it, scaled to `scale`.
function valueCells(row, v, scale) {
  row.appendChild(el("td", (v >= 0 ? "+" : "") + Number(v).toFixed(3)));
  const bar = el("span", null, v >= 0 ? "bar-pos" : "bar-neg");
  bar.style.width = (scale > 0 ? Math.round(120 * Math.abs(v) / scale) : 0) + "px";
  const cell = el("td");
  cell.appendChild(bar);
  row.appendChild(cell);
}

// The EHR modality's value split over its groups (finetune.attribution): the record first, then the groups
// ranked by |value|; a lab not measured reads "absent" (the same as removed: exactly 0); a merged player's
// value cell lists its members ("sex F; race WHITE; ...").
function renderEhrGroups(g, ehrValue) {
  const box = el("div", null, "ehr-groups");
  box.appendChild(el("h4", "Inside the EHR (exact Owen values over its groups, logit)"));
  if (g.error) { box.appendChild(el("p", "Not computed: " + g.error, "muted")); return box; }
  const rows = [{ name: "record present, nothing known", shown: "every lab not measured, demographics unknown",
    value: g.record }].concat(g.groups || []);
  const scale = maxAbs(rows.map((r) => r.value));
  const table = el("table");
  const head = el("tr");
  ["group", "value", "contribution", ""].forEach((h) => head.appendChild(el("th", h)));
  table.appendChild(head);
  rows.forEach((r) => {
    const row = el("tr", null, r.known === false ? "null-group" : null);
    row.appendChild(el("td", r.name));
    row.appendChild(el("td", r.shown));
    valueCells(row, r.value, scale);
    table.appendChild(row);
  });
  box.appendChild(table);
  box.appendChild(el("p", "The rows sum to " + (g.total >= 0 ? "+" : "") + Number(g.total).toFixed(3)
    + (ehrValue === undefined ? "" : ", the EHR modality's Shapley value") + "; " + g.removal + ".", "muted"));
  // more known groups than the exact limit: a merged row ("demographics") is a set of groups moving together
  if (g.coarsened) box.appendChild(el("p", "Partition coarsened: " + g.coarsened + ".", "muted coarsened"));
  return box;
}

function renderExplanation(x) {
  const box = el("div", null, "explanation");
  if (x.error) { box.appendChild(el("p", "No explanation: " + x.error, "muted")); return box; }
  const out = x.output || {};
  box.appendChild(el("h3", "Prediction" + (x.task ? " (" + x.task + ")" : "")));
  box.appendChild(el("p", "probability " + Number(out.probability).toFixed(3) + " (logit " + Number(out.full).toFixed(3)
    + "; every modality masked " + Number(out.empty).toFixed(3) + "); used: " + x.used));
  const table = el("table");
  const head = el("tr");
  ["modality", "Shapley (logit)", "", "attention"].forEach((h) => head.appendChild(el("th", h)));
  table.appendChild(head);
  const scale = maxAbs(Object.values(x.shapley || {}));
  Object.entries(x.shapley || {}).forEach(([m, v]) => {
    const row = el("tr");
    row.appendChild(el("td", m));
    valueCells(row, v, scale);
    const att = (x.attention || {})[m];
    row.appendChild(el("td", att === undefined || att === null ? "n/a" : Number(att).toFixed(3)));
    table.appendChild(row);
  });
  box.appendChild(table);
  if (x.ehr_groups) box.appendChild(renderEhrGroups(x.ehr_groups, (x.shapley || {}).ehr));
  const cases = x.similar_cases || [];
  box.appendChild(el("p", cases.length + " similar cases of other patients; neighbour vote "
    + (x.neighbour_vote === null || x.neighbour_vote === undefined ? "n/a" : Number(x.neighbour_vote).toFixed(3))
    + " beside the model's " + Number(out.probability).toFixed(3)));
  if (x.similar_note) box.appendChild(el("p", x.similar_note, "similar-note"));  // why there is no vote
  if (cases.length) {
    const t = el("table", null, "similar");
    const h = el("tr");
    ["study", "patient", "similarity", "labels", "outcome"].forEach((c) => h.appendChild(el("th", c)));
    t.appendChild(h);
    cases.forEach((c) => {
      const r = el("tr");
      [c.study_id, c.subject_id, Number(c.similarity).toFixed(3), (c.labels || []).join(", "),
        c.outcome === null ? "unknown" : c.outcome].forEach((v) => r.appendChild(el("td", v)));
      t.appendChild(r);
    });
    box.appendChild(t);
  }
  return box;
}

async function openCase(studyId) {
  busy("opening study " + studyId + "…");
  try {
    const c = await api("/api/case/" + encodeURIComponent(studyId) + (k() ? "?k=" + k() : ""));
    const box = $("case");
    clear(box);
    box.appendChild(el("h2", "Study " + c.study_id + " (patient " + c.subject_id + ")"));
    const facts = [c.split, c.study_datetime, c.sex, c.age_band].filter((v) => v);
    box.appendChild(el("p", facts.join(" \u00b7 "), "muted"));
    const images = el("div", null, "case-images");
    c.images.forEach((im) => { if (im.thumbnail_url) images.appendChild(thumbnail(im.dicom_id)); });
    box.appendChild(images);
    box.appendChild(el("p", "Labels: " + (c.labels.length ? c.labels.join(", ") : "none positive")
      + (c.uncertain.length ? "; uncertain: " + c.uncertain.join(", ") : "")));
    const sections = c.sections || {};
    Object.keys(sections).forEach((name) => {
      box.appendChild(el("h3", name.replace(/_/g, " ")));
      box.appendChild(el("div", sections[name], "section-text"));
    });
    if (!Object.keys(sections).length && c.report) box.appendChild(el("div", c.report, "section-text"));
    if (c.explanation) box.appendChild(renderExplanation(c.explanation));
    box.hidden = false;
    box.scrollIntoView({ block: "start" });
    done("study " + c.study_id);
    document.body.dataset.cases = String(Number(document.body.dataset.cases || 0) + 1);
  } catch (e) {
    fail(e.message);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Queries

async function search(label, url, options) {
  busy("searching (" + label + ")…");
  const t0 = performance.now();
  try {
    show(await api(url, options), t0);
  } catch (e) {
    fail(e.message);
  }
}

function json(body) {
  return { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
}

function init() {
  $("image-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const file = $("image-file").files[0];
    if (!file) { fail("choose a file first"); return; }
    if (INFO && file.size > INFO.limits.max_upload_bytes) {
      fail("the file has " + file.size + " bytes, above the service's limit of " + INFO.limits.max_upload_bytes);
      return;
    }
    const query = new URLSearchParams({ filters: JSON.stringify(filters()) });
    if (k()) query.set("k", k());
    search("image", "/api/search/image?" + query.toString(),
      { method: "POST", headers: { "Content-Type": "application/octet-stream" }, body: file });
  });
  $("text-form").addEventListener("submit", (e) => {
    e.preventDefault();
    search("text", "/api/search/text", json({ text: $("text-input").value, k: k(), filters: filters() }));
  });
  $("study-form").addEventListener("submit", (e) => {
    e.preventDefault();
    search("study", "/api/search/study", json({ study_id: $("study-input").value.trim(), k: k(),
      exclude_patient: $("exclude-patient").checked, filters: filters() }));
  });
  api("/api/info").then((info) => {
    INFO = info;
    const ix = info.index;
    $("index-info").textContent = ix.count + " images of split " + ix.split + " (" + ix.modalities.join(" + ")
      + "), encoder " + ix.encoder_checksum + (info.task ? "; explanations for " + info.task : "");
    const f = info.filters;
    checkboxes($("f-view"), f.view, "view");
    checkboxes($("f-split"), f.split, "split");
    checkboxes($("f-sex"), f.sex, "sex");
    checkboxes($("f-age_band"), f.age_band, "age_band");
    options($("f-present"), f.labels);
    options($("f-absent"), f.labels);
    if (f.date_min) { $("f-date-from").min = f.date_min; $("f-date-to").min = f.date_min; }
    if (f.date_max) { $("f-date-from").max = f.date_max; $("f-date-to").max = f.date_max; }
    $("k-input").value = info.limits.default_k;
    $("k-input").max = info.limits.max_k;
    document.body.dataset.ready = "1";
  }).catch((e) => fail(e.message));
}

document.addEventListener("DOMContentLoaded", init);
