source scripts/device_setup.sh || exit 1
python3 -m pytest -q -p no:cacheprovider -p no:warnings tests/test_data_tokenizer.py 2>&1 | tail -5
python3 -c "
from transformers import AutoTokenizer; import json
t=AutoTokenizer.from_pretrained('/tmp/qc/models/smollm2-135m-instruct'); print('eos', t.eos_token, t.eos_token_id, json.load(open('/tmp/qc/models/smollm2-135m-instruct/config.json'))['eos_token_id'])"
