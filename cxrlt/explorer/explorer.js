(() => {
  'use strict';
  const data = JSON.parse(document.getElementById('cam-data').textContent);
  const $ = (id) => document.getElementById(id);
  const OUTCOMES = {tp: 'true positive', fp: 'false positive', fn: 'false negative', tn: 'true negative'};
  const SEP = '\u0000';

  // Every string from the data enters the page as text (textContent or an attribute value), never as markup.
  function el(tag, props, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === undefined || v === null) continue;
      if (k === 'class') e.className = v;
      else if (k === 'text') e.textContent = v;
      else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, String(v));
    }
    for (const c of children) if (c !== null && c !== undefined) e.append(c);
    return e;
  }
  const fmt = (x, d = 3) => (x === null || x === undefined || Number.isNaN(x)) ? 'n/a' : Number(x).toFixed(d);
  const methodName = (m) => (data.method_names && data.method_names[m]) || m;

  const tiles = new Map();
  for (const t of data.tiles) tiles.set([t.model, t.method, t.class, t.image].join(SEP), t);
  const models = new Map(data.models.map((m) => [m.id, m]));

  const state = {
    models: new Set(data.models.slice(0, 2).map((m) => m.id)),
    classes: new Set(data.classes.slice(0, 2)),
    method: data.methods[0],
    perClass: data.n_images,
    filter: 'all',
    threshold: data.threshold,
  };
  let shown = [];      // tiles on screen, in reading order
  let current = -1;    // index in `shown` of the enlarged tile

  function outcome(t) {
    const called = t.probability >= state.threshold;
    return t.truth ? (called ? 'tp' : 'fn') : (called ? 'fp' : 'tn');
  }

  function choiceList(fieldset, items, idOf, labelOf, selected, kind, plural) {
    const box = fieldset.querySelector('.options');
    items.forEach((item, i) => {
      const input = el('input', {type: 'checkbox', id: `${kind}-${i}`, 'data-kind': kind});
      input.checked = selected.has(idOf(item));
      input.addEventListener('change', () => {
        if (input.checked) selected.add(idOf(item)); else selected.delete(idOf(item));
        render();
      });
      box.append(el('div', {class: 'option'}, input, el('label', {for: `${kind}-${i}`, text: labelOf(item)})));
    });
    const setAll = (on) => {
      items.forEach((item, i) => {
        $(`${kind}-${i}`).checked = on;
        if (on) selected.add(idOf(item)); else selected.delete(idOf(item));
      });
      render();
    };
    $(`${plural}-all`).addEventListener('click', () => setAll(true));
    $(`${plural}-none`).addEventListener('click', () => setAll(false));
  }

  function modelLabel(m) {
    const bits = [m.backbone, m.loss].filter(Boolean).join(', ');
    return bits ? `${m.name} (${bits})` : m.name;
  }

  function tileButton(t, o, index, row, col) {
    const m = models.get(t.model);
    const truth = t.truth ? 'positive' : 'negative';
    return el('button', {
      type: 'button', class: `tile ${o}`, 'data-index': index, 'data-row': row, 'data-col': col,
      'aria-label': `${t.class}, ${m.name}, image ${t.image}: probability ${fmt(t.probability)}, ground truth ${truth}, ${OUTCOMES[o]}${t.map_empty ? ', empty map' : ''}`,
      onclick: () => openDetail(index),
    },
      el('img', {src: t.src, alt: `${methodName(t.method)} map of ${t.class} by ${m.name} on ${t.image}`, loading: 'lazy',
                 width: data.tile_width, height: data.tile_height}),
      el('span', {class: 'prob', text: `p = ${fmt(t.probability)}`}),
      el('span', {class: 'badge', text: o.toUpperCase(), title: OUTCOMES[o]}),
      el('span', {class: 'truth', text: `GT ${truth}`}),
      t.map_empty ? el('span', {class: 'empty', text: 'empty map', title: 'no positive evidence for this class anywhere in the image'}) : null);
  }

  function render() {
    const grid = $('grid');
    const head = grid.tHead, body = grid.tBodies[0];
    head.replaceChildren(); body.replaceChildren();
    shown = [];
    const ms = data.models.filter((m) => state.models.has(m.id));
    const cs = data.classes.filter((c) => state.classes.has(c));
    if (!ms.length || !cs.length) { $('status').textContent = 'Choose at least one model and one class.'; return; }
    head.append(el('tr', {}, el('th', {scope: 'col', text: 'class · image'}),
      ...ms.map((m) => el('th', {scope: 'col', title: modelLabel(m), text: m.name}))));
    let row = 0, hidden = 0;
    for (const c of cs) {
      for (const p of data.panel) {
        if (p.class !== c || p.slot >= state.perClass) continue;
        const cells = [];
        let n = 0;
        ms.forEach((m, col) => {
          const t = tiles.get([m.id, state.method, c, p.image].join(SEP));
          if (!t) { cells.push(el('td', {class: 'missing', text: 'not computed'})); return; }
          const o = outcome(t);
          if (state.filter !== 'all' && o !== state.filter) { hidden++; cells.push(el('td', {class: 'filtered', text: '·'})); return; }
          cells.push(el('td', {}, tileButton(t, o, shown.length, row, col)));
          shown.push(t); n++;
        });
        if (!n) continue;
        body.append(el('tr', {},
          el('th', {scope: 'row'}, el('span', {class: 'cls', text: c}), el('span', {class: 'img', text: p.image}),
             el('span', {class: `gt ${p.truth ? 'pos' : 'neg'}`, text: p.truth ? 'GT positive' : 'GT negative'})),
          ...cells));
        row++;
      }
    }
    const what = state.filter === 'all' ? '' : ` (${OUTCOMES[state.filter]}s at p ≥ ${fmt(state.threshold, 2)}; ${hidden} hidden)`;
    $('status').textContent = `${shown.length} tile${shown.length === 1 ? '' : 's'}: ${ms.length} model${ms.length === 1 ? '' : 's'} × `
      + `${cs.length} class${cs.length === 1 ? '' : 'es'} × up to ${state.perClass} image${state.perClass === 1 ? '' : 's'}, ${methodName(state.method)}${what}`;
  }

  function fact(dl, name, value) { dl.append(el('dt', {text: name}), el('dd', {text: value})); }

  function fillDetail() {
    const t = shown[current], m = models.get(t.model), o = outcome(t);
    const info = data.images[t.image] || {};
    $('detail-title').textContent = `${t.class} · ${m.name} · ${t.image}`;
    const ov = $('detail-overlay');
    ov.src = t.src; ov.alt = `${methodName(t.method)} map of ${t.class} by ${m.name} on ${t.image}`;
    $('detail-overlay-caption').textContent = `${methodName(t.method)} map of the ${t.class} logit`;
    const im = $('detail-image');
    im.src = info.src || ''; im.alt = `chest X-ray ${t.image}`;
    const dl = $('detail-facts');
    dl.replaceChildren();
    fact(dl, 'class', t.class);
    fact(dl, 'probability', fmt(t.probability, 4));
    fact(dl, 'logit', fmt(t.logit, 3));
    fact(dl, 'ground truth', t.truth ? 'positive' : 'negative');
    fact(dl, `at threshold ${fmt(state.threshold, 2)}`, OUTCOMES[o]);
    fact(dl, 'image', t.image);
    fact(dl, 'its positive classes', (info.positives && info.positives.length) ? info.positives.join(', ') : 'none');
    fact(dl, 'model (run)', m.name);
    fact(dl, 'backbone · loss · sampler', [m.backbone, m.loss, m.sampler].filter(Boolean).join(' · ') || 'n/a');
    const pc = (m.per_class || {})[t.class] || {};
    fact(dl, `validation AP / AUC of ${t.class}`, `${fmt(pc.AP)} / ${fmt(pc.AUC)}`);
    fact(dl, 'validation mAP of the model', fmt(m.val_mAP));
    fact(dl, 'method', methodName(t.method));
    if (m.feature_map) fact(dl, 'map resolution', `${m.feature_map.join('×')} cells at ${m.input_size} px input`);
    fact(dl, 'map', t.map_empty ? 'empty: no positive evidence for this class anywhere in the image'
                                : 'scaled to its own maximum (colours compare places within a map, not across maps)');
    fact(dl, 'tile', `${current + 1} of ${shown.length}`);
    $('detail-prev').disabled = current <= 0;
    $('detail-next').disabled = current >= shown.length - 1;
  }

  function openDetail(index) {
    current = index;
    fillDetail();
    const d = $('detail');
    if (!d.open) d.showModal();
  }
  function step(by) {
    const next = current + by;
    if (next < 0 || next >= shown.length) return;
    current = next; fillDetail();
  }

  function moveFocus(from, key) {
    const r = Number(from.dataset.row), c = Number(from.dataset.col);
    const all = [...document.querySelectorAll('#grid .tile')];
    const dir = {ArrowRight: [0, 1], ArrowLeft: [0, -1], ArrowDown: [1, 0], ArrowUp: [-1, 0]}[key];
    let best = null, bestCost = Infinity;
    for (const b of all) {
      const dr = Number(b.dataset.row) - r, dc = Number(b.dataset.col) - c;
      const along = dr * dir[0] + dc * dir[1];
      if (along <= 0) continue;
      const across = Math.abs(dir[0] ? dc : dr);
      const cost = along + 4 * across;
      if (cost < bestCost) { best = b; bestCost = cost; }
    }
    if (best) best.focus();
  }

  function setup() {
    const nm = data.models.length, nc = data.classes.length;
    $('summary').textContent = `${nm} model${nm === 1 ? '' : 's'} × ${nc} class${nc === 1 ? '' : 'es'}, `
      + `${data.n_images} validation image${data.n_images === 1 ? '' : 's'} per class (positives first); `
      + `${data.methods.map(methodName).join(' and ')} at each backbone's last feature map; built ${data.created}.`;
    choiceList($('model-choice'), data.models, (m) => m.id, modelLabel, state.models, 'model', 'models');
    choiceList($('class-choice'), data.classes, (c) => c, (c) => c, state.classes, 'class', 'classes');
    const method = $('method');
    for (const m of data.methods) method.append(el('option', {value: m, text: methodName(m)}));
    method.disabled = data.methods.length < 2;
    method.addEventListener('change', () => { state.method = method.value; render(); });
    const per = $('per-class');
    for (let k = 1; k <= data.n_images; k++) per.append(el('option', {value: k, text: String(k)}));
    per.value = String(state.perClass);
    per.addEventListener('change', () => { state.perClass = Number(per.value); render(); });
    $('filter').addEventListener('change', () => { state.filter = $('filter').value; render(); });
    const th = $('threshold');
    th.value = String(state.threshold);
    th.addEventListener('input', () => {
      const v = Number(th.value);
      if (th.value !== '' && v >= 0 && v <= 1) { state.threshold = v; render(); }
    });
    $('grid').addEventListener('keydown', (e) => {
      if (e.target.classList.contains('tile') && e.key.startsWith('Arrow')) { e.preventDefault(); moveFocus(e.target, e.key); }
    });
    const d = $('detail');
    $('detail-prev').addEventListener('click', () => step(-1));
    $('detail-next').addEventListener('click', () => step(1));
    $('detail-close').addEventListener('click', () => d.close());
    d.addEventListener('keydown', (e) => {
      if (e.key === 'ArrowRight') { e.preventDefault(); step(1); }
      else if (e.key === 'ArrowLeft') { e.preventDefault(); step(-1); }
    });
    d.addEventListener('click', (e) => {   // a click on the backdrop, outside the dialog's box, closes it
      const r = d.getBoundingClientRect();
      if (e.target === d && (e.clientX < r.left || e.clientX > r.right || e.clientY < r.top || e.clientY > r.bottom)) d.close();
    });
    d.addEventListener('close', () => {   // after the browser's own focus restoration: focus the tile shown last
      setTimeout(() => {
        const b = document.querySelector(`#grid .tile[data-index="${current}"]`);
        if (b) b.focus();
      }, 0);
    });
    render();
  }
  setup();
})();
