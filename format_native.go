package batch

import (
	"cmp"
	"context"
	"net/http"
	"strings"

	"github.com/caddy-batch/batch/internal/jsontext"
	"github.com/tidwall/gjson"
)

// Request forms; the answer mirrors the form of the request.
const (
	formArray    = iota // bare array of operations
	formEnvelope        // {"batch": [...], ...}
	formBulk            // {"operation": {...}, "items": [...], ...}
)

// nativeFormat is caddy-batch's own: a bare array of operations, an
// envelope, or one operation with many items; answered in the same form.
type nativeFormat struct{}

var native format = nativeFormat{}

func (nativeFormat) name() string { return "native" }

func (nativeFormat) decode(r *http.Request, body []byte, lim *rules) (*batch, error) {
	return parseBatch(r.Context(), body, lim)
}

// sink streams results as JSON, or as NDJSON when r asks for it.
func (nativeFormat) sink(w http.ResponseWriter, r *http.Request, b *batch) sink {
	if wantsNDJSON(r) {
		b.lean.oneLine = true
		return &ndjsonSink{w: w, rc: http.NewResponseController(w), lean: b.lean}
	}
	return &httpSink{w: w, form: b.form, lean: b.lean}
}

func (nativeFormat) refuse(w http.ResponseWriter, status int, msg string, faults badBatchError) error {
	if len(faults) > 0 {
		return writeFaults(w, faults)
	}
	return writeError(w, status, msg)
}

// parseBatch parses and validates a whole batch body. The error is a
// badBatchError, a tooManyOpsError, or ctx's error once the client is gone;
// nothing may run unless it is nil.
func parseBatch(ctx context.Context, body []byte, lim *rules) (*batch, error) {
	problem, topCommas := jsontext.Check(body, maxJSONDepth)
	if problem != "" {
		return nil, badBatchError{{Index: -1, Message: "batch " + problem}}
	}
	root := gjson.ParseBytes(body)
	p := parser{lim: lim, ctx: ctx}
	b := &batch{}
	var opsJSON, bulkOp gjson.Result
	var items gjson.Result

	switch {
	case root.IsArray():
		b.form = formArray
		opsJSON = root
	case root.IsObject():
		b.form = formEnvelope
		seen := map[string]bool{}
		root.ForEach(func(k, v gjson.Result) bool {
			key := k.String()
			if seen[key] {
				p.batchFault("field %q given twice", short(key))
				return true
			}
			seen[key] = true
			switch key {
			case "batch":
				opsJSON = v
				if !v.IsArray() {
					p.batchFault(`"batch" must be an array of operations`)
				}
			case "operation":
				bulkOp = v
				b.form = formBulk
			case "items":
				items = v
				if !v.IsArray() {
					p.batchFault("\"items\" must be an array")
				}
			case "mode":
				switch s := v.String(); {
				case v.Type == gjson.String && (s == modeSequential || s == modeParallel):
					b.mode = s
				default:
					p.batchFault("mode must be \"sequential\" or \"parallel\", got %s", short(v.Raw))
				}
			case "atomicity":
				switch s := v.String(); {
				case v.Type == gjson.String && (s == atomicNone || s == atomicStopOnError || s == atomicAllOrNothing):
					b.atomicity = s
				default:
					p.batchFault("atomicity must be \"none\", \"stop_on_error\" or \"all_or_nothing\", got %s", short(v.Raw))
				}
			case "max_attempts":
				b.maxAttempts = p.maxAttempts(v)
			case "max_failures", "max_failure_rate":
				p.budgetField(b, key, v)
			case "metadata":
				p.metadataField(b, v)
			case "key_concurrency":
				b.keyConcurrency = p.keyConcurrency(v)
			case "async", "dry_run", "omit_response_on_success", "include_headers":
				if !v.IsBool() {
					p.batchFault("%s must be true or false, got %s", key, short(v.Raw))
				}
				switch key {
				case "async":
					b.async = v.Bool()
				case "dry_run":
					b.dryRun = v.Bool()
				case "omit_response_on_success":
					b.lean.omitSuccess = v.Bool()
				case "include_headers":
					b.lean.noHeaders = !v.Bool()
				}
			default:
				p.batchFault("unknown field %q", short(key))
			}
			return true
		})
		switch {
		case b.form == formBulk && opsJSON.Exists():
			p.batchFault("give either \"batch\" or \"operation\" with \"items\", not both")
		case b.form == formBulk && !items.Exists():
			p.batchFault("\"operation\" needs \"items\"")
		case b.form == formEnvelope && items.Exists():
			p.batchFault("\"items\" needs \"operation\"")
		case b.form == formEnvelope && !opsJSON.Exists():
			p.batchFault("missing \"batch\": the array of operations")
		}
	default:
		return nil, badBatchError{{Index: -1, Message: "batch must be a JSON array of operations or an object"}}
	}
	// Count before parsing any operation, so an oversized batch costs nothing.
	list := opsJSON
	if b.form == formBulk {
		list = items
	}
	var n int
	if b.form == formArray && topCommas > 0 {
		n = topCommas + 1 // counted on the way: no second pass
	} else {
		n = jsontext.Count(list)
	}
	if err := p.errFaults(); err != nil {
		return nil, err
	}
	if err := p.counted(n); err != nil {
		return nil, err
	}
	if b.mode == "" {
		b.mode = lim.mode
	}
	if b.atomicity == "" {
		b.atomicity = lim.atomicity
	}
	if b.atomicity != atomicNone {
		b.mode = modeSequential // a failure must stop what comes after it
	}

	p.alloc(b, n)
	if b.form == formBulk {
		p.parseBulk(b, bulkOp, items)
	} else {
		p.parseEach(b, list, nil)
	}
	return p.finish(b)
}

// parseBulk expands {"operation": ..., "items": [...]} into one operation
// per item, all sharing the bulk operation's validated method, target and
// headers, unless item templates fill them in from each item.
func (p *parser) parseBulk(b *batch, bulkJSON, items gjson.Result) {
	bulk := p.parseBulkOp(bulkJSON)
	encoding := bulkJSON.Get("body_encoding")
	headerFor := map[string]http.Header{}
	items.ForEach(func(_, item gjson.Result) bool {
		op := p.newOp()
		p.fillItem(op, len(b.ops), bulk, item, encoding, headerFor)
		b.ops = append(b.ops, op)
		return p.goOn(len(b.ops))
	})
}

// parseBulkOp parses the operation of a bulk batch, and sets the budget
// of its item templates.
func (p *parser) parseBulkOp(v gjson.Result) *operation {
	bulk := p.parseOperation(-1, v, kindBulk)
	if len(bulk.depIDs) > 0 {
		p.opFault(bulk, "the operation of a bulk batch cannot have depends_on")
	}
	p.resetItemBudget()
	return bulk
}

// resetItemBudget gives the item templates of a batch, or of a chunk of
// a job, their budget.
func (p *parser) resetItemBudget() {
	p.items = itemBudget{bytes: cmp.Or(p.lim.maxRefSize, defaultMaxSize), scan: maxRefScan}
}

// maxAttempts reads the batch field max_attempts.
func (p *parser) maxAttempts(v gjson.Result) int {
	return p.wholeField("max_attempts", v, maxBatchAttempts)
}

// keyConcurrency reads the batch field key_concurrency.
func (p *parser) keyConcurrency(v gjson.Result) int {
	return p.wholeField("key_concurrency", v, maxKeyConcurrency)
}

// wholeField reads a batch field that takes a whole number from 1 to hi;
// 0 when it is not one, a fault said.
func (p *parser) wholeField(name string, v gjson.Result, hi int64) int {
	n := v.Int()
	if v.Type != gjson.Number || float64(n) != v.Num || n < 1 || n > hi {
		p.batchFault("%s must be a whole number from 1 to %d, got %s", name, hi, short(v.Raw))
		return 0
	}
	return int(n)
}

// wantsNDJSON reports whether the client asked for results as NDJSON.
func wantsNDJSON(r *http.Request) bool {
	for _, v := range r.Header.Values("Accept") {
		for _, part := range splitComma(v) {
			mt, _, _ := strings.Cut(part, ";")
			if strings.EqualFold(strings.TrimSpace(mt), "application/x-ndjson") {
				return true
			}
		}
	}
	return false
}
