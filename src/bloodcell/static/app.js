// bloodcell lab page: plain JS, no build step, no network beyond this server.
"use strict";

const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#d4a72c", "#b07aa1", "#9c755f"];
const UPLOAD_CONCURRENCY = 3;

const S = {
  classes: [], color: {}, multiAvailable: false,
  sampleId: null, sampleName: null, samples: [],
  cells: [], cards: new Map(),
  filter: { flag: "all", cls: "" },
  view: { ids: [], pos: -1, saliency: false },
  upload: { total: 0, done: 0, errors: 0 },
};

const $ = (sel) => document.querySelector(sel);
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}
const pct = (p) => `${Math.round(100 * p)}%`;
const dot = (cls) => { const d = el("span", { class: "dot" }); d.style.background = S.color[cls] || "#999"; return d; };

async function api(path, opts = {}) {
  const r = await fetch(path, opts);
  let body = null;
  try { body = await r.json(); } catch (_) { /* not JSON */ }
  if (!r.ok) {
    const msg = body && body.detail ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)) : r.statusText;
    const err = new Error(msg); err.status = r.status; throw err;
  }
  return body;
}

// ------------------------------------------------------------------ start
async function init() {
  const [card, health] = await Promise.all([api("/api/model"), api("/api/health")]);
  S.classes = card.classes;
  S.classes.forEach((c, i) => { S.color[c] = PALETTE[i % PALETTE.length]; });
  S.multiAvailable = !!health.multi_cell_screen;
  $("#chip-multi").hidden = !S.multiAvailable;
  $("#diff-wbc-label").hidden = !S.classes.some((c) => WHITE_CELLS.includes(c));
  renderModelCard(card);
  const sel = $("#class-filter");
  for (const c of S.classes) sel.append(el("option", { value: c, text: c }));
  buildClassButtons();
  await refreshSamples();
  const wanted = localStorage.getItem("bloodcell.sample");
  const pick = S.samples.find((s) => s.name === wanted) || S.samples[0];
  if (pick) await loadSample(pick.id);
  else newSample(defaultSampleName());
  wire();
}

function defaultSampleName() {
  const d = new Date();
  const z = (n) => String(n).padStart(2, "0");
  return `sample ${d.getFullYear()}-${z(d.getMonth() + 1)}-${z(d.getDate())} ${z(d.getHours())}:${z(d.getMinutes())}`;
}

function renderModelCard(card) {
  const m = card.metrics;
  const box = $("#model-card");
  box.append(el("div", {}, el("strong", { text: "Model " }), `${card.architecture} · ${card.image_size}px · version ${card.version}`));
  if (m && typeof m.accuracy === "number") {
    box.append(el("div", { text: `test accuracy ${(100 * m.accuracy).toFixed(1)}%` +
      (typeof m.macro_f1 === "number" ? ` · macro F1 ${(100 * m.macro_f1).toFixed(1)}%` : "") +
      (m.n_images ? ` · n=${m.n_images}` : "") }));
  }
  box.append(el("div", { text: `cells below ${Math.round(100 * card.review_threshold)}% confidence are flagged for review` }));
}

// ------------------------------------------------------------------ samples
async function refreshSamples() {
  S.samples = (await api("/api/samples")).samples;
  const sel = $("#sample-select");
  sel.textContent = "";
  for (const s of S.samples) {
    sel.append(el("option", { value: s.id, text: `${clip(s.name)} (${s.n_cells})`, title: s.name }));
  }
  if (S.sampleId === null && S.sampleName) {
    sel.prepend(el("option", { value: "", text: `${clip(S.sampleName)} (new)`, title: S.sampleName }));
  }
  sel.value = S.sampleId || "";
  sel.title = S.sampleName || "";  // the full name on hover
}

// a long sample name (up to 200 characters) must not widen the header past the export buttons
const clip = (name, n = 40) => (name.length > n ? `${name.slice(0, n - 1)}…` : name);

async function loadSample(id) {
  const s = await api(`/api/samples/${encodeURIComponent(id)}`);
  S.sampleId = s.id; S.sampleName = s.name;
  localStorage.setItem("bloodcell.sample", s.name);
  S.cells = s.cells;
  resetGrid();
  $("#sample-select").value = s.id;
  $("#sample-select").title = s.name;
  updateExports();
}

function newSample(name) {
  S.sampleId = null; S.sampleName = name; S.cells = [];
  localStorage.setItem("bloodcell.sample", name);
  resetGrid();
  refreshSamples();
  updateExports();
}

function updateExports() {
  for (const [sel, ext] of [["#export-csv", "csv"], ["#export-zip", "zip"]]) {
    const a = $(sel);
    if (S.sampleId) { a.href = `/api/samples/${S.sampleId}/export.${ext}`; a.classList.remove("disabled"); a.removeAttribute("aria-disabled"); }
    else { a.removeAttribute("href"); a.setAttribute("aria-disabled", "true"); }
  }
}

// ------------------------------------------------------------------ upload
async function filesFromDrop(dt) {
  // folders: walk the entries (webkitGetAsEntry), keeping the relative path as a display name
  const items = [...(dt.items || [])].map((i) => i.webkitGetAsEntry && i.webkitGetAsEntry()).filter(Boolean);
  if (!items.length) return [...dt.files].map((f) => [f, f.name]);
  const out = [];
  async function walk(entry, prefix) {
    if (entry.isFile) {
      const f = await new Promise((res, rej) => entry.file(res, rej));
      out.push([f, prefix + f.name]);
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((res, rej) => reader.readEntries(res, rej));
        if (!batch.length) break;
        for (const e of batch) await walk(e, prefix + entry.name + "/");
      }
    }
  }
  for (const e of items) await walk(e, "");
  return out;
}

async function upload(pairs) {
  // hidden files (.DS_Store and the like) are not cells
  pairs = pairs.filter(([, name]) => !name.split("/").pop().startsWith("."));
  if (!pairs.length) return;
  if (!S.sampleName) S.sampleName = defaultSampleName();
  S.upload.total += pairs.length;
  showProgress();
  let next = 0;
  async function worker() {
    while (next < pairs.length) {
      const [file, name] = pairs[next++];
      const fd = new FormData();
      fd.append("files", file, name);
      fd.append("sample", S.sampleName);
      try {
        const res = await api("/api/predict", { method: "POST", body: fd });
        if (S.sampleId === null) { S.sampleId = res.sample_id; updateExports(); }
        for (const r of res.results) {
          if (r.status === "ok") addCell(resultToCell(r, res.sample_id));
          else addError(r.error || `${r.file}: could not be read`);
        }
      } catch (e) {
        addError(e.status === 413 || e.status === 422 ? e.message : `${name}: ${e.message}`);
      }
      S.upload.done++;
      showProgress();
    }
  }
  await Promise.all(Array.from({ length: UPLOAD_CONCURRENCY }, worker));
  await refreshSamples();
}

// the example cells bundled with bloodcell, classified by the server into a demo sample
async function loadExamples() {
  const btn = $("#load-examples");
  btn.disabled = true;
  $("#status").textContent = "Classifying the example cells…";
  try {
    const res = await api("/api/examples", { method: "POST" });
    for (const r of res.results) if (r.status === "error") addError(r.error);
    await loadSample(res.sample_id);
    await refreshSamples();
    $("#status").textContent = res.n_ok ? `Classified ${res.n_ok} example cells into sample “${res.sample}”`
      : `The example cells are already in sample “${res.sample}”`;
  } catch (e) {
    $("#status").textContent = `Could not load the example cells: ${e.message}`;
  } finally {
    btn.disabled = false;
  }
}

const OTHER_LABS_NOTE = "Its colours are unlike the training images, so the other-labs model " +
  "(trained for other stains, scanners and zooms) classified it; it needs review.";

function resultToCell(r, sampleId) {
  return { id: r.cell_id, sample_id: sampleId, file_name: r.file, predicted_class: r.class,
    probability: r.probability, probabilities: r.probabilities, top3: r.top3,
    needs_review: r.needs_review, multi_cell: r.multi_cell, multi_cell_score: r.multi_cell_score,
    input_warnings: r.input_warnings || [], true_class: null, class: r.class, corrected: false,
    model: r.model };
}

function addError(msg) {
  S.upload.errors++;
  $("#errors").append(el("li", { text: msg }));
}

function showProgress() {
  const u = S.upload;
  const busy = u.done < u.total;
  $("#status").textContent = u.total === 0 ? "" :
    (busy ? `Classifying… ${u.done} of ${u.total}` : `Classified ${u.total - u.errors} of ${u.total} files`) +
    (u.errors ? ` · ${u.errors} could not be read (see below)` : "");
  if (!busy) { u.total = 0; u.done = 0; u.errors = 0; }
}

// ------------------------------------------------------------------ grid
function addCell(c) {
  S.cells.push(c);
  $("#grid").append(cardFor(c));
  applyFilter(); renderDiff();
}

function resetGrid() {
  S.cards.clear();
  const g = $("#grid");
  g.textContent = "";
  for (const c of S.cells) g.append(cardFor(c));
  applyFilter(); renderDiff();
}

function cardFor(c) {
  let card = S.cards.get(c.id);
  if (!card) {
    card = el("button", { class: "card", "data-cell-id": c.id, title: c.file_name });
    card.append(el("img", { src: `/api/cells/${c.id}/image`, alt: c.file_name, loading: "lazy" }),
      el("div", { class: "meta" }));
    card.addEventListener("click", () => openViewer(c.id));
    S.cards.set(c.id, card);
  }
  card.classList.toggle("review", c.needs_review && !c.corrected);
  card.classList.toggle("multi", !!c.multi_cell);
  card.classList.toggle("unusual", hasWarnings(c));
  card.classList.toggle("corrected", !!c.corrected);
  const meta = card.querySelector(".meta");
  meta.textContent = "";
  const flags = el("div", { class: "flags" });
  if (c.corrected) flags.append(el("span", { class: "tag corrected", text: c.true_class === c.predicted_class ? "✓ confirmed" : "✓ corrected" }));
  else if (c.needs_review) flags.append(el("span", { class: "tag review", text: "review" }));
  if (c.multi_cell) flags.append(el("span", { class: "tag multi", text: "multi-cell" }));
  if (hasWarnings(c)) flags.append(el("span", { class: "tag unusual", text: "unusual input", title: c.input_warnings.join("\n") }));
  if (c.model === "other-labs") flags.append(el("span", { class: "tag unusual", text: "other-labs model", title: OTHER_LABS_NOTE }));
  meta.append(...[
    el("div", { class: "card-row" },
      el("span", { class: "card-class" }, dot(c.class), el("span", { class: "card-class-name", text: c.class })),
      el("span", { class: "conf", text: pct(c.probability) })),
    c.corrected && c.true_class !== c.predicted_class ? el("div", { class: "was", text: `model: ${c.predicted_class}` }) : null,
    flags,
    el("div", { class: "fname", text: c.file_name })].filter(Boolean));
  return card;
}

function hasWarnings(c) {
  return Array.isArray(c.input_warnings) && c.input_warnings.length > 0;
}

function matches(c) {
  const f = S.filter;
  if (f.cls && c.class !== f.cls) return false;
  if (f.flag === "review") return c.needs_review && !c.corrected;
  if (f.flag === "multi") return !!c.multi_cell;
  if (f.flag === "unusual") return hasWarnings(c);
  if (f.flag === "corrected") return c.corrected;
  return true;
}

function applyFilter() {
  let shown = 0;
  for (const c of S.cells) {
    const card = S.cards.get(c.id);
    const ok = matches(c);
    card.hidden = !ok;
    shown += ok;
  }
  const n = (p) => S.cells.filter(p).length;
  $("#n-all").textContent = S.cells.length;
  $("#n-review").textContent = n((c) => c.needs_review && !c.corrected);
  $("#n-multi").textContent = n((c) => !!c.multi_cell);
  $("#n-unusual").textContent = n(hasWarnings);
  $("#n-corrected").textContent = n((c) => c.corrected);
  const empty = $("#empty");
  empty.hidden = shown > 0;
  $("#examples").hidden = S.cells.length > 0;
  empty.textContent = S.cells.length ? "No cells match this filter." : "No cells in this sample yet. Drop images above to classify them.";
}

// ------------------------------------------------------------------ differential
// 95 % Wilson score interval of k/n, as differential.proportion_ci computes it
function proportionCI(k, n, z = 1.959964) {
  if (n <= 0) return [0, 0];
  const p = k / n, denom = 1 + z * z / n;
  const centre = (p + z * z / (2 * n)) / denom;
  const half = z * Math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom;
  return [Math.max(0, centre - half), Math.min(1, centre + half)];
}

// multi-cell or unusual input: left out of the count (as `bloodcell predict` does)
// until a reviewer sets its class; serve.differential() counts the same way
const isFlagged = (c) => !!c.multi_cell || hasWarnings(c);
const isCounted = (c) => c.corrected || !isFlagged(c);

// the white-cell differential of a lab report (differential.leukocyte_differential)
const WHITE_CELLS = ["basophil", "eosinophil", "ig", "lymphocyte", "monocyte", "neutrophil"];

function renderDiff() {
  const counts = Object.fromEntries(S.classes.map((c) => [c, 0]));
  const counted = S.cells.filter(isCounted);
  for (const c of counted) counts[c.class] = (counts[c.class] || 0) + 1;
  const total = counted.length, leftOut = S.cells.length - total;
  const white = S.classes.filter((c) => WHITE_CELLS.includes(c));
  const byWhite = $("#diff-wbc").checked && white.length > 0;
  const base = byWhite ? white.reduce((a, c) => a + counts[c], 0) : total;
  const tb = $("#diff-table tbody");
  tb.textContent = "";
  for (const cls of S.classes) {
    const n = counts[cls];
    let pctText = base ? (100 * n / base).toFixed(1) : "0.0";
    let ciText = base ? proportionCI(n, base).map((v) => (100 * v).toFixed(1)).join("–") : "";
    if (byWhite && !white.includes(cls)) {
      ciText = cls === "erythroblast" ? "per 100 WBC" : "not a WBC";
      if (cls !== "erythroblast") pctText = "–";
    }
    const tr = el("tr", { class: n ? "" : "zero", "data-class": cls },
      el("td", { class: "cls" }, dot(cls), cls),
      el("td", { class: "num diff-n", text: String(n) }),
      el("td", { class: "num", text: pctText }),
      el("td", { class: "num ci", text: ciText }));
    tb.append(tr);
  }
  $("#diff-total").textContent = base;
  const corrected = S.cells.filter((c) => c.corrected).length;
  const review = S.cells.filter((c) => c.needs_review && !c.corrected).length;
  $("#diff-summary").textContent = `${S.cells.length} cells · ${corrected} reviewed · ${review} need review` +
    (leftOut ? ` · ${leftOut} flagged not counted until reviewed` : "");
  drawChart(counts, base, byWhite ? white : S.classes);
}

function drawChart(counts, total, classes) {
  const NS = "http://www.w3.org/2000/svg";
  const svg = $("#diff-chart");
  const W = 294, row = 22, left = 86, right = 44;
  const H = classes.length * row + 4;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.textContent = "";
  const max = Math.max(1, ...classes.map((c) => counts[c]));
  const mk = (tag, a, text) => {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(a)) e.setAttribute(k, v);
    if (text != null) e.textContent = text;
    svg.append(e); return e;
  };
  classes.forEach((cls, i) => {
    const y = i * row + 2, n = counts[cls];
    const w = (W - left - right) * n / max;
    mk("text", { x: left - 6, y: y + 14, "text-anchor": "end", class: "lbl" }, cls);
    mk("rect", { x: left, y: y + 3, width: W - left - right, height: 14, rx: 3, fill: "#f0f2f5" });
    if (n) mk("rect", { x: left, y: y + 3, width: Math.max(2, w), height: 14, rx: 3, fill: S.color[cls] });
    mk("text", { x: left + Math.max(2, w) + 5, y: y + 14 }, total ? `${(100 * n / total).toFixed(0)}%` : "");
  });
}

// ------------------------------------------------------------------ viewer
function buildClassButtons() {
  const box = $("#v-classes");
  S.classes.forEach((cls, i) => {
    const b = el("button", { class: "class-btn", "data-class": cls }, dot(cls), cls, i < 9 ? el("kbd", { text: String(i + 1) }) : null);
    b.addEventListener("click", () => correct(cls));
    box.append(b);
  });
}

function currentCell() {
  const id = S.view.ids[S.view.pos];
  return S.cells.find((c) => c.id === id);
}

function openViewer(id) {
  // navigation follows the grid as filtered when the viewer opened
  S.view.ids = S.cells.filter(matches).map((c) => c.id);
  S.view.pos = Math.max(0, S.view.ids.indexOf(id));
  renderViewer();
  const d = $("#viewer");
  if (!d.open) d.showModal();
}

function renderViewer() {
  const c = currentCell();
  if (!c) return;
  $("#v-img").src = `/api/cells/${c.id}/image`;
  const sal = $("#v-sal");
  sal.removeAttribute("src");
  showSaliency(S.view.saliency);
  $("#v-file").textContent = c.file_name;
  const vc = $("#v-class");
  vc.textContent = "";
  vc.append(dot(c.class), c.class, el("span", { class: "conf", text: c.corrected ? "reviewed" : pct(c.probability) }));
  const flags = $("#v-flags");
  flags.textContent = "";
  if (c.corrected && c.true_class !== c.predicted_class) flags.append(el("span", { class: "tag corrected", text: `corrected · model said ${c.predicted_class} (${pct(c.probability)})` }));
  else if (c.corrected) flags.append(el("span", { class: "tag corrected", text: "✓ prediction confirmed" }));
  else if (c.needs_review && !hasWarnings(c)) flags.append(el("span", { class: "tag review", text: "needs review: low confidence" }));
  if (c.multi_cell) flags.append(el("span", { class: "tag multi", text: `multi-cell image (score ${Number(c.multi_cell_score).toFixed(2)})` }));
  if (hasWarnings(c)) for (const w of c.input_warnings) flags.append(el("span", { class: "tag unusual", text: `unusual input: ${w}` }));
  if (c.model === "other-labs") flags.append(el("span", { class: "tag unusual", text: "classified by the other-labs model", title: OTHER_LABS_NOTE }));
  const ol = $("#v-top3");
  ol.textContent = "";
  for (const t of c.top3) {
    const bar = el("div", { class: "bar" }, el("span"));
    bar.firstChild.style.width = `${(100 * t.probability).toFixed(1)}%`;
    bar.firstChild.style.background = S.color[t.class];
    ol.append(el("li", {}, el("span", { text: t.class }), bar, el("span", { class: "num", text: `${(100 * t.probability).toFixed(1)}%` })));
  }
  for (const b of document.querySelectorAll(".class-btn")) {
    b.classList.toggle("chosen", b.dataset.class === c.true_class);
    b.classList.toggle("predicted", b.dataset.class === c.predicted_class);
  }
  $("#v-pos").textContent = `${S.view.pos + 1} of ${S.view.ids.length}`;
  $("#v-prev").disabled = S.view.pos <= 0;
  $("#v-next").disabled = S.view.pos >= S.view.ids.length - 1;
}

function showSaliency(on) {
  S.view.saliency = on;
  const c = currentCell();
  const sal = $("#v-sal");
  if (on && c && !sal.getAttribute("src")) sal.src = `/api/cells/${c.id}/saliency`;
  sal.hidden = !on; $("#v-img").hidden = on; $("#v-sal-note").hidden = !on;
  $("#v-show-img").classList.toggle("active", !on);
  $("#v-show-sal").classList.toggle("active", on);
}

function move(delta) {
  const p = S.view.pos + delta;
  if (p < 0 || p >= S.view.ids.length) return false;
  S.view.pos = p; renderViewer(); return true;
}

async function correct(cls) {
  const c = currentCell();
  if (!c) return;
  try {
    const res = await api(`/api/cells/${c.id}/correction`, {
      method: "PUT", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ true_class: cls }) });
    Object.assign(c, res.cell);
  } catch (e) {
    $("#status").textContent = `Could not save the correction: ${e.message}`;
    return;
  }
  cardFor(c); applyFilter(); renderDiff();
  if (cls && $("#v-advance").checked && move(1)) return;
  renderViewer();
}

// ------------------------------------------------------------------ events
function wire() {
  const drop = $("#drop");
  for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, () => drop.classList.remove("over"));
  drop.addEventListener("drop", async (e) => { e.preventDefault(); upload(await filesFromDrop(e.dataTransfer)); });
  // a file dropped outside the zone should not navigate away from the page
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  $("#file-input").addEventListener("change", (e) => { upload([...e.target.files].map((f) => [f, f.name])); e.target.value = ""; });
  $("#folder-input").addEventListener("change", (e) => { upload([...e.target.files].map((f) => [f, f.webkitRelativePath || f.name])); e.target.value = ""; });

  $("#load-examples").addEventListener("click", loadExamples);
  $("#sample-select").addEventListener("change", (e) => { if (e.target.value) loadSample(e.target.value); });
  $("#new-sample").addEventListener("submit", (e) => {
    e.preventDefault();
    const name = $("#new-sample-name").value.trim();
    if (!name) return;
    $("#new-sample-name").value = "";
    const existing = S.samples.find((s) => s.name === name);
    if (existing) loadSample(existing.id); else newSample(name);
  });

  for (const chip of document.querySelectorAll("#flag-filters .chip")) {
    chip.addEventListener("click", () => {
      S.filter.flag = chip.dataset.flag;
      for (const c of document.querySelectorAll("#flag-filters .chip")) c.classList.toggle("active", c === chip);
      applyFilter();
    });
  }
  $("#class-filter").addEventListener("change", (e) => { S.filter.cls = e.target.value; applyFilter(); });
  $("#diff-wbc").addEventListener("change", renderDiff);

  $("#v-close").addEventListener("click", () => $("#viewer").close());
  $("#viewer").addEventListener("click", (e) => { if (e.target === e.currentTarget) e.currentTarget.close(); });
  $("#v-prev").addEventListener("click", () => move(-1));
  $("#v-next").addEventListener("click", () => move(1));
  $("#v-show-img").addEventListener("click", () => showSaliency(false));
  $("#v-show-sal").addEventListener("click", () => showSaliency(true));
  $("#v-confirm").addEventListener("click", () => correct(currentCell().predicted_class));
  $("#v-clear").addEventListener("click", () => correct(null));
  document.addEventListener("keydown", (e) => {
    if (!$("#viewer").open || e.altKey || e.ctrlKey || e.metaKey) return;
    const k = e.key;
    if (/^[1-9]$/.test(k) && Number(k) <= S.classes.length) { e.preventDefault(); correct(S.classes[Number(k) - 1]); }
    else if (k === "0" || k === "Backspace" || k === "Delete") { e.preventDefault(); correct(null); }
    else if (k === "Enter") { e.preventDefault(); correct(currentCell().predicted_class); }
    else if (k === "ArrowRight") { e.preventDefault(); move(1); }
    else if (k === "ArrowLeft") { e.preventDefault(); move(-1); }
    else if (k === "s" || k === "S") { e.preventDefault(); showSaliency(!S.view.saliency); }
  });
}

init().catch((e) => { $("#status").textContent = `Could not start: ${e.message}`; });
