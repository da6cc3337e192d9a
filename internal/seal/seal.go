// Package seal encrypts what caddy-batch stores that may hold a
// credential (the headers a job's operations inherit, and its operations),
// so that storage shared by a cluster never holds one in clear.
package seal

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
)

// Sealer encrypts what a job stores that may hold a credential, with
// AES-256-GCM under the configured key; it opens what any of the keys it
// knows sealed, so that keys can be rotated.
type Sealer struct {
	keys []sealKey // the first seals
}

type sealKey struct {
	id   string
	aead cipher.AEAD
}

const sealMagic = "bsk1"

// New takes keys of 32 bytes, in hex or base64; the first seals.
func New(keys []string) (*Sealer, error) {
	s := new(Sealer)
	for i, k := range keys {
		raw, err := decodeKey(k)
		if err != nil {
			return nil, fmt.Errorf("key %d: %w", i+1, err)
		}
		block, err := aes.NewCipher(raw)
		if err != nil {
			return nil, err
		}
		aead, err := cipher.NewGCM(block)
		if err != nil {
			return nil, err
		}
		sum := sha256.Sum256(raw)
		s.keys = append(s.keys, sealKey{id: hex.EncodeToString(sum[:4]), aead: aead})
	}
	return s, nil
}

func decodeKey(k string) ([]byte, error) {
	k = strings.TrimSpace(k)
	if k == "" {
		return nil, errors.New("empty (is its environment variable set?)")
	}
	if raw, err := hex.DecodeString(k); err == nil && len(raw) == 32 {
		return raw, nil
	}
	for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.RawStdEncoding, base64.URLEncoding, base64.RawURLEncoding} {
		if raw, err := enc.DecodeString(k); err == nil && len(raw) == 32 {
			return raw, nil
		}
	}
	return nil, errors.New("must be 32 bytes, in hex (64 digits) or base64 (44 characters), such as `openssl rand -base64 32` prints")
}

// Seal encrypts plain for the storage key slot: sealed bytes moved to
// another key do not open.
func (s *Sealer) Seal(slot string, plain []byte) []byte {
	k := s.keys[0]
	out := make([]byte, 0, len(sealMagic)+len(k.id)+k.aead.NonceSize()+len(plain)+k.aead.Overhead())
	out = append(append(out, sealMagic...), k.id...)
	nonce := out[len(out) : len(out)+k.aead.NonceSize()]
	_, _ = rand.Read(nonce)
	out = out[:len(out)+len(nonce)]
	return k.aead.Seal(out, nonce, plain, []byte(slot))
}

// ErrSealed is what a job whose sealed parts cannot be opened fails with.
var ErrSealed = errors.New("cannot decrypt what the job stored")

// Open decrypts what Seal sealed for slot with any of the keys; a nil
// Sealer opens nothing.
func (s *Sealer) Open(slot string, sealed []byte) ([]byte, error) {
	if s == nil {
		return nil, fmt.Errorf("%w: it was encrypted, and no credentials_key is configured", ErrSealed)
	}
	if len(sealed) < len(sealMagic)+8 || string(sealed[:len(sealMagic)]) != sealMagic {
		return nil, fmt.Errorf("%w: not sealed data", ErrSealed)
	}
	id := string(sealed[len(sealMagic) : len(sealMagic)+8])
	for _, k := range s.keys {
		if k.id != id {
			continue
		}
		body := sealed[len(sealMagic)+8:]
		if len(body) < k.aead.NonceSize() {
			break
		}
		plain, err := k.aead.Open(nil, body[:k.aead.NonceSize()], body[k.aead.NonceSize():], []byte(slot))
		if err != nil {
			return nil, fmt.Errorf("%w: key %s does not open it (altered, or moved)", ErrSealed, id)
		}
		return plain, nil
	}
	return nil, fmt.Errorf("%w: sealed with key %s, which is not configured", ErrSealed, id)
}
