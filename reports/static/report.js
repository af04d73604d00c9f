/* convlens report: gallery paging and filters (index.html), keyboard navigation and
 * channel zoom (images/*.html).  No network, no innerHTML: every piece of data goes
 * into the page through textContent or setAttribute. */
(function () {
  "use strict";

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function pct(p) {
    return (p * 100).toFixed(1) + "%";
  }

  function typing(ev) {
    var t = ev.target;
    var tag = t && t.tagName ? t.tagName.toUpperCase() : "";
    return tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA" || (t && t.isContentEditable);
  }

  /* ---- index: the gallery ------------------------------------------------------ */
  function gallery() {
    var data = window.CONVLENS_GALLERY;
    var status = document.getElementById("gallery-status");
    var grid = document.getElementById("gallery");
    if (!grid) return;
    if (!data || !data.items) {
      status.textContent = "The gallery data (static/gallery-data.js) is missing: render the report again.";
      return;
    }
    // item fields, see data.fields
    var ID = 0, REL = 1, PRED = 2, PROB = 3, LABEL = 4, THUMB = 5, OV = 6, ERR = 7;
    var items = data.items;
    var classes = data.classes || [];
    var pageSize = Math.max(1, data.pageSize || 100);
    var ctl = {
      pred: document.getElementById("f-pred"),
      truth: document.getElementById("f-true"),
      outcome: document.getElementById("f-outcome"),
      sort: document.getElementById("f-sort"),
      q: document.getElementById("f-search"),
      overlay: document.getElementById("f-overlay")
    };
    var pager = {
      first: document.getElementById("pg-first"),
      prev: document.getElementById("pg-prev"),
      next: document.getElementById("pg-next"),
      last: document.getElementById("pg-last"),
      info: document.getElementById("pg-info")
    };
    var state = { pred: "", truth: "", outcome: "", sort: "", q: "", overlay: false, page: 1 };

    function className(i) {
      return i >= 0 && i < classes.length ? classes[i] : "class " + i;
    }

    function fillSelect(select, field) {
      var counts = {};
      for (var i = 0; i < items.length; i++) {
        var c = items[i][field];
        if (c >= 0) counts[c] = (counts[c] || 0) + 1;
      }
      var keys = Object.keys(counts).map(Number);
      keys.sort(function (a, b) {
        var x = className(a).toLowerCase(), y = className(b).toLowerCase();
        return x < y ? -1 : x > y ? 1 : a - b;
      });
      keys.forEach(function (k) {
        var o = el("option", null, className(k) + " (" + counts[k] + ")");
        o.value = String(k);
        select.appendChild(o);
      });
      if (!keys.length) select.disabled = true;
    }
    fillSelect(ctl.pred, PRED);
    fillSelect(ctl.truth, LABEL);

    function readHash() {
      var h = new URLSearchParams(location.hash.replace(/^#/, ""));
      state.pred = h.get("pred") || "";
      state.truth = h.get("true") || "";
      state.outcome = h.get("outcome") || "";
      state.sort = h.get("sort") || "";
      state.q = h.get("q") || "";
      state.overlay = h.get("overlay") === "1";
      state.page = Math.max(1, parseInt(h.get("page") || "1", 10) || 1);
      ctl.pred.value = state.pred;
      ctl.truth.value = state.truth;
      ctl.outcome.value = state.outcome;
      ctl.sort.value = state.sort;
      ctl.q.value = state.q;
      ctl.overlay.checked = state.overlay;
      // values that are not options (edited hash) fall back to "any"
      state.pred = ctl.pred.value;
      state.truth = ctl.truth.value;
      state.outcome = ctl.outcome.value;
      state.sort = ctl.sort.value;
    }

    function writeHash() {
      var h = new URLSearchParams();
      if (state.pred) h.set("pred", state.pred);
      if (state.truth) h.set("true", state.truth);
      if (state.outcome) h.set("outcome", state.outcome);
      if (state.sort) h.set("sort", state.sort);
      if (state.q) h.set("q", state.q);
      if (state.overlay) h.set("overlay", "1");
      if (state.page > 1) h.set("page", String(state.page));
      var s = h.toString();
      history.replaceState(null, "", s ? "#" + s : location.pathname + location.search);
    }

    function matches(it) {
      var failed = it[ERR] !== "";
      var o = state.outcome;
      if (o === "failed") {
        if (!failed) return false;
      } else if (o) {
        if (failed) return false;
        if (o === "unlabelled") {
          if (it[LABEL] >= 0) return false;
        } else {
          if (it[LABEL] < 0) return false;
          if ((o === "correct") !== (it[LABEL] === it[PRED])) return false;
        }
      }
      if (state.pred !== "" && it[PRED] !== Number(state.pred)) return false;
      if (state.truth !== "" && it[LABEL] !== Number(state.truth)) return false;
      if (state.q && it[REL].toLowerCase().indexOf(state.q.toLowerCase()) < 0) return false;
      return true;
    }

    function selection() {
      var out = [];
      for (var i = 0; i < items.length; i++) if (matches(items[i])) out.push(i);
      if (state.sort === "conf-desc" || state.sort === "conf-asc") {
        var sign = state.sort === "conf-desc" ? -1 : 1;
        out.sort(function (a, b) {
          var pa = items[a][PROB], pb = items[b][PROB];
          if ((pa < 0) !== (pb < 0)) return pa < 0 ? 1 : -1; // failed inputs last
          return pa === pb ? a - b : sign * (pa - pb);
        });
      }
      return out;
    }

    function thumbSrc(it) {
      return "assets/thumbs/" + it[ID] + ".jpg";
    }

    // the CAM heatmap of the top class, a small PNG laid over the thumbnail by report.css
    function overlaySrc(it) {
      return "assets/cams/" + it[ID] + "/" + data.overlays[it[OV]] + "_" + it[PRED] + ".png";
    }

    function card(it) {
      var failed = it[ERR] !== "";
      var label = it[LABEL];
      var kind = failed ? "failed" : label < 0 ? "unlabelled" : label === it[PRED] ? "correct" : "wrong";
      var c = el("article", "card " + kind);
      c.setAttribute("data-id", it[ID]);
      if (failed) {
        c.setAttribute("tabindex", "0"); // reachable by keyboard like the others
        c.setAttribute("aria-label", "failed: " + it[REL]);
        var box = el("div", "thumb thumb-failed");
        box.appendChild(el("span", null, "failed"));
        c.appendChild(box);
        var fb = el("div", "card-body");
        fb.appendChild(el("div", "card-path", it[REL]));
        fb.appendChild(el("div", "card-error", it[ERR]));
        c.appendChild(fb);
        return c;
      }
      var a = el("a", "thumb");
      a.setAttribute("href", "images/" + it[ID] + ".html");
      var hasOverlay = it[OV] >= 0 && it[THUMB];
      // the photo, and (once asked for) the heatmap on top of it
      var stack = el("span", "stack");
      if (it[THUMB]) {
        var img = el("img", "photo");
        img.addEventListener("load", function () {
          // fit the square both ways: report.css scales small photos up, large ones down
          stack.classList.add(img.naturalWidth >= img.naturalHeight ? "wide" : "tall");
        });
        img.setAttribute("src", thumbSrc(it));
        img.setAttribute("alt", it[REL]);
        img.setAttribute("decoding", "async");
        stack.appendChild(img);
        a.appendChild(stack);
      } else {
        a.appendChild(el("span", "muted", "no thumbnail"));
      }
      c.appendChild(a);
      var body = el("div", "card-body");
      var top = el("div", "card-top");
      top.appendChild(el("span", "cls", className(it[PRED])));
      top.appendChild(el("span", "prob" + (it[PROB] < 0.5 ? " low" : ""), pct(it[PROB])));
      body.appendChild(top);
      if (label >= 0) {
        var t = el("div", "card-label");
        t.appendChild(el("span", "badge " + (kind === "correct" ? "ok" : "bad"), kind));
        if (kind === "wrong") t.appendChild(el("span", "truth", "true: " + className(label)));
        body.appendChild(t);
      }
      var path = el("a", "card-path", it[REL]);
      path.setAttribute("href", "images/" + it[ID] + ".html");
      path.setAttribute("title", it[REL]);
      path.setAttribute("tabindex", "-1"); // one tab stop a card: its photo opens the same page
      body.appendChild(path);
      if (hasOverlay) {
        var b = el("button", "ov-toggle");
        b.setAttribute("type", "button");
        b.setAttribute("title", "toggle the " + ((data.methodLabels || [])[it[OV]] || "CAM") + " overlay of the top class");
        var showHeat = function (on) {
          var heat = stack.querySelector("img.heat");
          if (on && !heat) {
            heat = el("img", "heat");
            heat.setAttribute("src", overlaySrc(it));
            var label = (data.methodLabels || data.methods || [])[it[OV]] || "CAM";
            heat.setAttribute("alt", label + " of " + className(it[PRED]));
            heat.setAttribute("decoding", "async");
            stack.appendChild(heat);
          }
          if (heat) heat.hidden = !on;
          b.textContent = on ? "photo" : "CAM";
          b.setAttribute("aria-pressed", on ? "true" : "false");
        };
        showHeat(state.overlay);
        b.addEventListener("click", function () {
          var heat = stack.querySelector("img.heat");
          showHeat(!heat || heat.hidden);
        });
        body.appendChild(b);
      }
      c.appendChild(body);
      return c;
    }

    function render() {
      var sel = selection();
      var pages = Math.max(1, Math.ceil(sel.length / pageSize));
      if (state.page > pages) state.page = pages;
      var start = (state.page - 1) * pageSize;
      var frag = document.createDocumentFragment();
      for (var i = start; i < Math.min(sel.length, start + pageSize); i++) {
        frag.appendChild(card(items[sel[i]]));
      }
      while (grid.firstChild) grid.removeChild(grid.firstChild);
      grid.appendChild(frag);
      status.textContent = sel.length === items.length
        ? items.length + " inputs"
        : sel.length + " of " + items.length + " inputs match";
      pager.info.textContent = "page " + state.page + " of " + pages;
      pager.first.disabled = pager.prev.disabled = state.page <= 1;
      pager.next.disabled = pager.last.disabled = state.page >= pages;
      grid.setAttribute("data-page", String(state.page));
      grid.setAttribute("data-pages", String(pages));
      grid.setAttribute("data-matches", String(sel.length));
      writeHash();
    }

    function onChange() {
      state.pred = ctl.pred.value;
      state.truth = ctl.truth.value;
      state.outcome = ctl.outcome.value;
      state.sort = ctl.sort.value;
      state.q = ctl.q.value.trim();
      state.overlay = ctl.overlay.checked;
      state.page = 1;
      render();
    }
    [ctl.pred, ctl.truth, ctl.outcome, ctl.sort, ctl.overlay].forEach(function (c) {
      c.addEventListener("change", onChange);
    });
    var timer = 0;
    ctl.q.addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(onChange, 150);
    });

    function go(page) {
      state.page = page;
      render();
      document.getElementById("gallery-section").scrollIntoView();
    }
    pager.first.addEventListener("click", function () { go(1); });
    pager.prev.addEventListener("click", function () { go(Math.max(1, state.page - 1)); });
    pager.next.addEventListener("click", function () { go(state.page + 1); });
    pager.last.addEventListener("click", function () { go(1e9); });
    window.addEventListener("hashchange", function () {
      readHash();
      render();
    });

    /* keyboard: Tab reaches the first card; the arrow keys move between cards (up and
     * down by a row of the grid, past either end of the page to the next or previous
     * page), Home/End to the first/last card; Enter opens the focused image. */
    function cardLinks() {
      return Array.prototype.slice.call(grid.querySelectorAll(".card > a.thumb, .card.failed"));
    }
    function rowLength(links) {
      var top = links.length ? links[0].getBoundingClientRect().top : 0;
      var n = 0;
      while (n < links.length && Math.abs(links[n].getBoundingClientRect().top - top) < 2) n++;
      return Math.max(1, n);
    }
    function focusCard(i) {
      var links = cardLinks();
      if (!links.length) return;
      var target = links[Math.max(0, Math.min(links.length - 1, i))];
      target.focus();
      target.scrollIntoView({ block: "nearest" });
    }
    grid.addEventListener("keydown", function (ev) {
      if (ev.defaultPrevented || ev.altKey || ev.ctrlKey || ev.metaKey || ev.shiftKey) return;
      var links = cardLinks();
      var card = ev.target && ev.target.closest ? ev.target.closest(".card") : null;
      var at = card ? links.indexOf(card.classList.contains("failed") ? card : card.querySelector("a.thumb")) : -1;
      if (at < 0) return;
      var step = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -rowLength(links), ArrowDown: rowLength(links) }[ev.key];
      var pages = Number(grid.getAttribute("data-pages")) || 1;
      if (ev.key === "Home") focusCard(0);
      else if (ev.key === "End") focusCard(links.length - 1);
      else if (step === undefined) return;
      else if (at + step >= links.length && state.page < pages) {
        go(state.page + 1);
        focusCard(0);
      } else if (at + step < 0 && state.page > 1) {
        go(state.page - 1);
        focusCard(cardLinks().length - 1);
      } else focusCard(at + step);
      ev.preventDefault();
    });

    readHash();
    render();
  }

  /* ---- image pages: keyboard navigation and channel zoom ------------------------- */
  function imagePage() {
    var zoom = document.getElementById("zoom");
    var canvas = document.getElementById("zoom-canvas");
    var caption = document.getElementById("zoom-caption");
    var current = null; // {img, ch}

    function geometry(img) {
      var k = Number(img.getAttribute("data-k")) || 0;
      var cols = Number(img.getAttribute("data-cols")) || 16;
      if (!k || !img.naturalWidth) return null;
      var rows = Math.ceil(k / cols);
      var gap = 1;
      return {
        k: k, cols: cols, gap: gap,
        tw: (img.naturalWidth - (cols - 1) * gap) / cols,
        th: (img.naturalHeight - (rows - 1) * gap) / rows
      };
    }

    function show(img, ch) {
      var g = geometry(img);
      if (!g || ch < 0 || ch >= g.k) return;
      var col = ch % g.cols, row = Math.floor(ch / g.cols);
      var scale = Math.max(1, Math.floor(384 / Math.max(g.tw, g.th)));
      canvas.width = Math.round(g.tw * scale);
      canvas.height = Math.round(g.th * scale);
      var ctx = canvas.getContext("2d");
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(img, col * (g.tw + g.gap), row * (g.th + g.gap), g.tw, g.th,
        0, 0, canvas.width, canvas.height);
      caption.textContent = img.getAttribute("data-layer") + " · channel " + ch + " of " + g.k +
        " (← → step through channels)";
      current = { img: img, ch: ch };
      zoom.hidden = false;
    }

    function hide() {
      var back = current && current.img;
      zoom.hidden = true;
      current = null;
      if (back && back.getAttribute("tabindex") !== null) back.focus(); // where the keyboard was
    }

    Array.prototype.forEach.call(document.querySelectorAll("img.grid"), function (img) {
      img.addEventListener("click", function (ev) {
        var g = geometry(img);
        if (!g) return;
        var r = img.getBoundingClientRect();
        var x = (ev.clientX - r.left) * img.naturalWidth / r.width;
        var y = (ev.clientY - r.top) * img.naturalHeight / r.height;
        var col = Math.floor(x / (g.tw + g.gap));
        var row = Math.floor(y / (g.th + g.gap));
        if (col < 0 || col >= g.cols || row < 0) return;
        show(img, row * g.cols + col);
      });
      // by keyboard: Tab to a grid, Enter or Space opens its first channel
      img.setAttribute("tabindex", "0");
      img.setAttribute("role", "button");
      img.setAttribute("aria-label", "activations of " + img.getAttribute("data-layer") +
        ": Enter to enlarge channel by channel");
      img.addEventListener("keydown", function (ev) {
        if (current || (ev.key !== "Enter" && ev.key !== " ")) return;
        ev.preventDefault();
        show(img, 0);
      });
    });
    if (zoom) zoom.addEventListener("click", hide);

    document.addEventListener("keydown", function (ev) {
      if (ev.defaultPrevented || ev.altKey || ev.ctrlKey || ev.metaKey || ev.shiftKey || typing(ev)) return;
      if (current) {
        if (ev.key === "Escape") hide();
        else if (ev.key === "ArrowLeft") show(current.img, current.ch - 1);
        else if (ev.key === "ArrowRight") show(current.img, current.ch + 1);
        else return;
        ev.preventDefault();
        return;
      }
      var rel = ev.key === "ArrowLeft" ? "prev" : ev.key === "ArrowRight" ? "next" : null;
      if (!rel) return;
      var link = document.querySelector("a[rel=" + rel + "]");
      if (link) {
        ev.preventDefault();
        location.href = link.href;
      }
    });
  }

  var kind = document.body.getAttribute("data-page");
  if (kind === "index") gallery();
  else if (kind === "image") imagePage();
})();
